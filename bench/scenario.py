"""The chat benchmark's scenario: servers, users, sockets, the send schedule and the find-max steps.

Everything runs on 127.0.0.1 and stops by itself:

1. `manage.py migrate` on the bench database (`database_url`, by default
   var/bench.sqlite3), then K server processes on free ports, configured like
   production (DEBUG off, Redis pub/sub layer under a per-run prefix).
2. Users sign up through the site's own forms (or log in when a rerun finds
   them), several sockets per user like browser tabs; the rooms are created
   through the room form, fresh slugs every run.
3. N sockets connect round-robin over the processes and wait for `ready`.
4. In each room, `senders` of its sockets send `rate` messages per second
   *per room* between them (each sender rate/senders), on a fixed schedule,
   for `duration` seconds. Each body carries its send time, so every
   receiver measures one-way latency.
5. Once every socket has its messages (or `drain` seconds after the last
   send), the stored messages are read back through the WebSocket `history`
   frame (that is, from the database) and every socket's deliveries are
   checked against them; bench/report.py turns the counts into figures.

`find_max` repeats the measurement at rising per-room rates on the same
servers and sockets and stops at the first rate that fails. `baseline` then
runs the same measurement against `bench.tutorial_asgi:application` (a
textbook Channels consumer).
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from html import unescape
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from django.conf import settings

from bench import report
from bench.client import (
    BROWSER_EXTENSIONS,
    BenchSocket,
    HandshakeError,
    StepPlan,
    StepRaw,
    open_socket,
    parse_body,
    read_history,
    run_step,
    tally,
)
from bench.serverprocess import ClusterHost, ServerFailed, ServerProcess

MAIN_APP = "chatsite.asgi:application"
BASELINE_APP = "bench.tutorial_asgi:application"
MAIN_WS_PATH = "/ws/rooms/{slug}/?after=0"
BASELINE_WS_PATH = "/ws/tutorial/rooms/{slug}/"
READER_WS_PATH = "/ws/rooms/{slug}/"
DEFAULT_RATES = "10,20,30,40,60,80,100,120,160,200,240"
BENCH_SECRET_KEY = "chatbench-only-not-secret-" + "0" * 24
BENCH_PASSWORD = "Loadgen-pass-7c1e9f2a"
MAX_SOCKETS_PER_USER = 20
LOGIN_THREADS = 4
CONNECT_CONCURRENCY = 20
SERVER_START_TIMEOUT = 30.0
HTTP_TIMEOUT = 30.0
SOCKET_TIMEOUT = 15.0
STEP_PAUSE = 0.5  # seconds between find-max steps, for the servers to settle
CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
ERROR_ITEM = re.compile(r'<ul class="errorlist[^"]*"[^>]*>\s*<li>(.*?)</li>', re.S)


class BenchFailed(Exception):
    """The run could not be set up, or was interrupted; the message says what to fix."""

    def __init__(self, message: str, returncode: int = 1) -> None:
        super().__init__(message)
        self.returncode = returncode


class OutOfTime(Exception):
    """--max-seconds ran out."""


def default_database_url() -> str:
    return f"sqlite:///{Path(settings.BASE_DIR) / 'var' / 'bench.sqlite3'}"


def new_run_id() -> str:
    return time.strftime("%m%d%H%M%S") + secrets.token_hex(2)


def log_dir() -> Path:
    """Return var/bench-logs, where every server process writes its log."""
    path = Path(settings.BASE_DIR) / "var" / "bench-logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------
# Server processes: their environment and their database
# --------------------------------------------------------------------------


def server_env(*, database_url: str, run_id: str) -> dict[str, str]:
    """Return the environment of a production-like server process (DEBUG off, Redis under a per-run prefix)."""
    env = os.environ.copy()
    env.update(
        # SETTINGS_MODULE is None while settings are overridden (in tests).
        DJANGO_SETTINGS_MODULE=settings.SETTINGS_MODULE or os.environ["DJANGO_SETTINGS_MODULE"],
        DATABASE_URL=database_url,
        SECRET_KEY=BENCH_SECRET_KEY,
        DEBUG="0",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        CHANNEL_LAYER="redis",
        CHANNEL_LAYER_PREFIX=f"bench-{run_id}",
        REDIS_URL=settings.REDIS_URL,
        # A benchmark sends faster, and opens more sockets per user, than the limits allow people.
        CHAT_MESSAGE_RATE_LIMIT="1000000",
        CHAT_MAX_SOCKETS_PER_USER="100000",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("LOG_LEVEL", "WARNING")
    return env


def migrate(env: dict[str, str], timeout: float) -> None:
    """Run `manage.py migrate` on the servers' database (env["DATABASE_URL"])."""
    database_url = env["DATABASE_URL"]
    try:
        done = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"],
            cwd=settings.BASE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchFailed("manage.py migrate on the bench database did not finish in time.") from None
    if done.returncode != 0:
        raise BenchFailed(
            f"manage.py migrate on {database_url} failed (exit {done.returncode}); "
            f"check --database-url.\n{(done.stdout + done.stderr)[-1500:]}"
        )


# --------------------------------------------------------------------------
# HTTP: sign-up, log-in and room creation through the site's own forms
# --------------------------------------------------------------------------


class SiteSession:
    """A browser-like HTTP session against one server: cookies, CSRF tokens, Origin."""

    def __init__(self, server: ServerProcess, timeout: float) -> None:
        self.server = server
        self.timeout = timeout
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=self.timeout)
        headers = {}
        if self.cookies:
            headers["Cookie"] = self.cookie_header
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            headers["Origin"] = self.server.origin
            headers["Referer"] = self.server.origin + path
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
            for header in response.headers.get_all("Set-Cookie") or []:
                jar = SimpleCookie()
                jar.load(header)
                for name, morsel in jar.items():
                    if morsel["max-age"] == "0" or not morsel.value:
                        self.cookies.pop(name, None)
                    else:
                        self.cookies[name] = morsel.value
            return response.status, text
        finally:
            conn.close()

    def form_token(self, path: str) -> str:
        status, text = self.request("GET", path)
        match = CSRF_FIELD.search(text)
        if status != 200 or not match:
            raise BenchFailed(f"GET {path} on {self.server.name} gave HTTP {status} without a CSRF token.")
        return match.group(1)

    def post_form(self, path: str, form: dict, token_from: str | None = None) -> tuple[int, str]:
        token = self.form_token(token_from or path)
        return self.request("POST", path, {"csrfmiddlewaretoken": token, **form})

    @property
    def cookie_header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.cookies.items())

    @property
    def session_id(self) -> str | None:
        return self.cookies.get(settings.SESSION_COOKIE_NAME)


def form_error(html: str) -> str:
    match = ERROR_ITEM.search(html)
    return unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip() if match else "no error message on the page"


def sign_in(server: ServerProcess, username: str, password: str, timeout: float) -> tuple[SiteSession, str]:
    """Sign up `username`, or log in when it exists already; return the session and which it was."""
    site = SiteSession(server, timeout)
    status, html = site.post_form(
        "/accounts/signup/", {"username": username, "password1": password, "password2": password}
    )
    if status in (302, 303) and site.session_id:
        return site, "signed up"
    if status != 400 or "already exists" not in html:
        raise BenchFailed(
            f"Signing up {username!r} on {server.name} failed (HTTP {status}): {form_error(html)}\n{server.log_tail()}"
        )
    status, html = site.post_form("/accounts/login/", {"username": username, "password": password})
    if status in (302, 303) and site.session_id:
        return site, "logged in"
    raise BenchFailed(
        f"{username!r} exists in the bench database but logging in failed (HTTP {status}): "
        f"{form_error(html)}. It was probably made with another password: use a fresh --database-url "
        f"(or delete the bench database file) or another --user-prefix."
    )


def create_room(site: SiteSession, slug: str, name: str) -> None:
    status, html = site.post_form("/rooms/new/", {"name": name, "slug": slug, "topic": "chatbench"}, token_from="/")
    if status not in (302, 303):
        raise BenchFailed(
            f"Creating room {slug!r} on {site.server.name} failed (HTTP {status}): {form_error(html)}\n"
            f"{site.server.log_tail()}"
        )


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass
class Options:
    """What one run measures: `manage.py chatbench`'s options, with its defaults."""

    server: str = "uvicorn"
    processes: int = 1
    sockets: int = 200
    rooms: int = 1
    senders: int = 10
    # Distinct signed-in users the sockets belong to; 0: one per MAX_SOCKETS_PER_USER sockets, like browser tabs.
    users: int = 0
    # Print each step's per-second timeline (it is in the JSON report either way).
    timeline: bool = False
    # Offer permessage-deflate as browsers do.
    deflate: bool = False
    rate: float = 20.0
    duration: float = 10.0
    body_size: int = 100
    database_url: str = field(default_factory=default_database_url)
    find_max: bool = False
    rates: str = DEFAULT_RATES
    p99_limit_ms: float = 250.0
    drain: float = 5.0
    warmup: float = 1.0
    # Seconds with every socket open and no message sent: the servers' idle CPU (0: not measured).
    idle: float = 0.0
    baseline: bool = False
    # Measure the app hosts of `bin/cluster up` (CLUSTER_NAME) through its HAProxy instead of starting servers.
    cluster: str = ""
    user_prefix: str = "bench"
    json_path: str | None = None
    max_seconds: float = 600.0

    def check(self) -> list[float]:
        """Raise BenchFailed for options that cannot make a run; return the per-room rates to measure."""
        for name in ("processes", "sockets", "rooms", "senders"):
            if getattr(self, name) < 1:
                raise BenchFailed(f"--{name} must be at least 1.")
        if self.sockets < self.rooms:
            raise BenchFailed("--sockets must be at least --rooms: every room needs a socket.")
        if self.idle < 0:
            raise BenchFailed("--idle must be 0 (not measured) or a number of seconds.")
        if self.rate <= 0 or self.duration <= 0:
            raise BenchFailed("--rate and --duration must be positive.")
        try:
            rates = [float(r) for r in self.rates.split(",") if r.strip()] if self.find_max else [self.rate]
        except ValueError:
            raise BenchFailed(f"--rates must be comma-separated numbers, not {self.rates!r}.") from None
        if not rates or min(rates) <= 0:
            raise BenchFailed("--rates needs at least one positive rate.")
        if self.cluster and self.baseline:
            raise BenchFailed("--baseline starts servers of its own: it cannot be measured on --cluster.")
        if self.baseline and importlib.util.find_spec(BASELINE_APP.split(":")[0]) is None:
            raise BenchFailed(
                f"--baseline needs the module {BASELINE_APP.split(':')[0]} (bench/tutorial_asgi.py), "
                "which was not found."
            )
        return rates


class ChatBench:
    """One benchmark run: set up, measure every phase, report; every server stops whatever happens."""

    def __init__(self, options: Options, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        self.rates = options.check()
        self.loop_ms = report.python_loop_ms()
        if options.database_url.startswith("sqlite:///"):
            Path(options.database_url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)

    # -- entry point -----------------------------------------------------------

    def execute(self) -> dict:
        """Run, print the report and return it; raise BenchFailed when nothing could be measured."""
        o = self.options
        self.started = time.monotonic()
        self.deadline = self.started + o.max_seconds
        self.run_id = new_run_id()
        self.log_dir = log_dir()
        self.servers: list[ServerProcess] = []
        self.number = 1  # message numbers, unique within the run
        self.report: dict = {
            "run_id": self.run_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self.config(),
            "setup": {},
            "aborted": None,
            **self.empty_results(),
        }
        self.say(self.banner())
        # The hard cap: whatever hangs, the servers die a little after the deadline.
        watchdog = threading.Timer(o.max_seconds + 15, self.kill_all)
        watchdog.daemon = True
        watchdog.start()
        previous_term = None
        if threading.current_thread() is threading.main_thread():
            previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        failure: BenchFailed | None = None
        try:
            self.run()
        except OutOfTime as error:
            self.report["aborted"] = f"--max-seconds ({o.max_seconds:g}) ran out {error}"
            self.say(f"ABORTED: {self.report['aborted']}; reporting what was measured.")
        except KeyboardInterrupt:
            self.report["aborted"] = "interrupted"
            failure = BenchFailed("Interrupted (Ctrl-C or SIGTERM); every server was stopped.", returncode=130)
        except BenchFailed as error:
            failure = error
            self.report["aborted"] = f"setup failed: {str(error).splitlines()[0]}"
        finally:
            watchdog.cancel()
            self.stop_all()
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        measured = self.measured()
        if measured or failure is None:
            self.finish_report()
        if failure is None and not measured:
            failure = BenchFailed(f"Nothing was measured: {self.report['aborted']}. Raise --max-seconds.")
        if failure is not None:
            raise failure
        return self.report

    def empty_results(self) -> dict:
        """Return the report's result keys, before anything is measured."""
        return {"main": None, "baseline": None, "ratios": None}

    def banner(self) -> str:
        o = self.options
        load = f"find-max over {o.rates}" if o.find_max else f"{o.rate:g} msg/s per room"
        return (
            f"chatbench {self.run_id}: {o.sockets} sockets, {o.rooms} room(s), "
            f"{f'cluster {o.cluster}' if o.cluster else f'{o.server} x{o.processes}'}, {load}, "
            f"{o.duration:g} s per measurement; logs in {self.log_dir}\n"
            f"machine: {os.cpu_count()} CPUs; a {report.LOOP_STEPS:,}-step Python loop takes {self.loop_ms:g} ms "
            "(slower machines give proportionally worse figures)"
        )

    def measured(self) -> bool:
        """Whether the run measured anything worth reporting (an aborted run may have)."""
        return bool(self.report["main"] and self.report["main"]["steps"])

    def config(self) -> dict:
        o = self.options
        return {
            "server": o.server,
            "processes": o.processes,
            "cluster": o.cluster or None,
            "sockets": o.sockets,
            "rooms": o.rooms,
            "senders_per_room": o.senders,
            "rate_per_room": None if o.find_max else o.rate,
            "rates": self.rates if o.find_max else None,
            "duration_s": o.duration,
            "body_size": o.body_size,
            "deflate_offered": o.deflate,
            "find_max": o.find_max,
            "baseline": o.baseline,
            "p99_limit_ms": o.p99_limit_ms,
            "drain_s": o.drain,
            "warmup_s": o.warmup,
            "idle_s": o.idle,
            "database_url": o.database_url,
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "python_loop_ms": self.loop_ms,
        }

    def finish_report(self) -> None:
        o = self.options
        report.finish(self.report, find_max=o.find_max)
        self.say(report.render(self.report, find_max=o.find_max, p99_limit_ms=o.p99_limit_ms, timelines=o.timeline))
        report.write(self.report, o.json_path, self.say)

    # -- set-up ------------------------------------------------------------------

    def run(self) -> None:
        o = self.options
        started = time.monotonic()
        if o.cluster:
            try:
                main_servers: list[ServerProcess] = list(ClusterHost.of_cluster(o.cluster))
            except ServerFailed as error:
                raise BenchFailed(str(error)) from None
            self.say(f"cluster {o.cluster}: app hosts {', '.join(s.name for s in main_servers)} "
                     f"through HAProxy on 127.0.0.1:{main_servers[0].port}")  # fmt: skip
        else:
            self.migrate_database()
            started = time.monotonic()
            main_servers = self.start_servers("main", MAIN_APP, o.processes)
        self.report["setup"]["servers_up_s"] = round(time.monotonic() - started, 1)
        self.sessions = self.sign_in_users(main_servers)
        self.reader = main_servers[0]  # serves `history` reads for both phases
        rooms = self.create_rooms("m")
        loop_factory = uvloop_factory()
        self.report["config"]["client_loop"] = "uvloop" if loop_factory else "asyncio"
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            self.report["main"] = self.new_phase("main", MAIN_APP, main_servers, rooms, MAIN_WS_PATH)
            self.run_phase(runner, self.report["main"], main_servers, rooms, MAIN_WS_PATH, expect_ready=True)
            if not o.baseline:
                return
            # Only the reader stays up (idle but for `history` reads; its CPU is not counted).
            for server in main_servers[1:]:
                server.stop()
            base_servers = self.start_servers("baseline", BASELINE_APP, o.processes)
            base_rooms = self.create_rooms("b")
            self.report["baseline"] = self.new_phase(
                "baseline", BASELINE_APP, base_servers, base_rooms, BASELINE_WS_PATH
            )
            self.run_phase(
                runner, self.report["baseline"], base_servers, base_rooms, BASELINE_WS_PATH, expect_ready=False
            )
            for server in base_servers:
                server.stop()

    def migrate_database(self) -> None:
        """Set the servers' environment and migrate their database (bench/storm.py does the same)."""
        o = self.options
        self.env = server_env(database_url=o.database_url, run_id=self.run_id)
        started = time.monotonic()
        self.say(f"migrate: {o.database_url}")
        migrate(self.env, timeout=min(180.0, self.remaining("migrate")))
        self.report["setup"]["migrate_s"] = round(time.monotonic() - started, 1)

    def remaining(self, stage: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OutOfTime(f"during {stage}")
        return left

    def start_servers(self, phase: str, app: str, count: int) -> list[ServerProcess]:
        kind = self.options.server
        new = [
            ServerProcess(
                f"{phase}-{kind}-{i + 1}",
                kind,
                app,
                self.env,
                self.log_dir / f"{self.run_id}-{phase}-{kind}-{i + 1}.log",
            )
            for i in range(count)
        ]
        self.servers.extend(new)  # before spawning, so cleanup sees them whatever happens
        for server in new:
            server.spawn()
        timeout = min(SERVER_START_TIMEOUT, self.remaining(f"starting {phase} servers"))
        with ThreadPoolExecutor(max_workers=count) as pool:
            for future in [pool.submit(server.wait_ready, timeout) for server in new]:
                try:
                    future.result()
                except ServerFailed as error:
                    raise BenchFailed(str(error)) from None
        ports = ", ".join(f"{s.port} (pid {s.proc.pid})" for s in new)
        self.say(f"{phase}: {count} x {kind} {app} up on {ports}")
        return new

    def sign_in_users(self, servers: list[ServerProcess], count: int | None = None) -> list[SiteSession]:
        """Sign in `count` users (by default one per MAX_SOCKETS_PER_USER sockets, like browser tabs)."""
        o = self.options
        count = count or o.users or math.ceil(o.sockets / MAX_SOCKETS_PER_USER)
        names = [f"{o.user_prefix}-u{i + 1:03d}" for i in range(count)]
        per_user = math.ceil(o.sockets / count)
        self.say(f"users: signing in {count} ({per_user} sockets per user at most; ~0.4 s of hashing each)")
        started = time.monotonic()
        sessions: list[SiteSession | None] = [None] * count
        how = Counter()
        timeout = min(HTTP_TIMEOUT, self.remaining("sign-in"))
        with ThreadPoolExecutor(max_workers=min(LOGIN_THREADS, count)) as pool:
            futures = {
                pool.submit(sign_in, servers[i % len(servers)], name, BENCH_PASSWORD, timeout): i
                for i, name in enumerate(names)
            }
            try:
                for done, future in enumerate(as_completed(futures, timeout=self.remaining("sign-in")), 1):
                    index = futures[future]
                    sessions[index], way = future.result()
                    how[way] += 1
                    if done == count or done % max(1, count // 5) == 0:
                        self.say(f"users: {done}/{count} ({time.monotonic() - started:.1f} s)")
            except TimeoutError:
                raise OutOfTime("during sign-in") from None
            finally:
                for future in futures:
                    future.cancel()
        self.report["setup"]["users"] = count
        self.report["setup"]["users_signed_up"] = how["signed up"]
        self.report["setup"]["users_logged_in"] = how["logged in"]
        self.report["setup"]["users_s"] = round(time.monotonic() - started, 1)
        return sessions

    def create_rooms(self, tag: str) -> list[str]:
        slugs = [f"bench-{self.run_id}-{tag}{n + 1}" for n in range(self.options.rooms)]
        site = SiteSession(self.reader, min(HTTP_TIMEOUT, self.remaining("room creation")))
        site.cookies = dict(self.sessions[0].cookies)
        for slug in slugs:
            create_room(site, slug, f"Bench {slug}")
        self.say(f"rooms: {', '.join(slugs)}")
        return slugs

    def new_phase(self, name: str, app: str, servers: list[ServerProcess], rooms: list[str], path: str) -> dict:
        return {
            "name": name,
            "app": app,
            "server": self.options.server,
            "processes": len(servers),
            "pids": [s.proc.pid for s in servers],
            "ws_path": path,
            "rooms": rooms,
            "sockets_requested": self.options.sockets,
            "sockets_connected": 0,
            "connect_failures": {},
            "connect_s": None,
            "steps": [],
            "max_rate": None,
            "warmup": None,
            "idle": None,
            "log_warnings": {},
        }

    def run_phase(self, runner, phase: dict, servers, rooms, path: str, *, expect_ready: bool) -> None:
        try:
            runner.run(
                asyncio.wait_for(
                    self.measure_phase(phase, servers, rooms, path, expect_ready),
                    self.remaining(f"the {phase['name']} measurement"),
                )
            )
        except TimeoutError:
            raise OutOfTime(f"during the {phase['name']} measurement") from None
        finally:
            phase["log_warnings"] = self.scan_logs(servers)

    # -- sockets -------------------------------------------------------------------

    async def measure_phase(self, phase: dict, servers, rooms, path: str, expect_ready: bool) -> None:
        sockets: list[BenchSocket | None] = [None] * self.options.sockets
        try:
            self.targets = await self.connect_sockets(phase, servers, rooms, path, expect_ready, sockets)
            await self.run_steps(phase, servers, rooms, sockets)
        finally:
            for sock in sockets:
                if sock is not None:
                    sock.close()
            await asyncio.sleep(0.2)  # let the close frames go out

    async def connect_sockets(
        self, phase: dict, servers, rooms, path: str, expect_ready: bool, sockets: list
    ) -> list[tuple[int, int, ServerProcess, str]]:
        """Fill `sockets` (None where a connect failed); return each one's (room, j, server, session id)."""
        name = phase["name"]
        count = self.options.sockets
        n_rooms = len(rooms)
        # Socket i is in room i % R; the sockets of a room go round-robin over the processes.
        targets = []
        for i in range(count):
            room, j = i % n_rooms, i // n_rooms
            server = servers[(j + room) % len(servers)]
            session = self.sessions[i % len(self.sessions)]
            targets.append((room, j, server, session.session_id))

        failures: Counter[str] = Counter()
        started = time.monotonic()
        progress = {"done": 0, "next": max(1, count // 4)}
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def connect(i: int) -> None:
            room, _, server, sid = targets[i]
            async with gate:
                try:
                    sockets[i] = await self.open_member_socket(
                        server, sid, path.format(slug=rooms[room]), room, wait_ready=expect_ready
                    )
                except (OSError, HandshakeError, TimeoutError) as error:
                    failures[f"{type(error).__name__}: {error}"[:160]] += 1
            progress["done"] += 1
            if progress["done"] >= progress["next"] or progress["done"] == count:
                progress["next"] += max(1, count // 4)
                connected = sum(s is not None for s in sockets)
                self.say(f"{name}: sockets {connected}/{count} connected ({time.monotonic() - started:.1f} s)")

        await asyncio.gather(*(connect(i) for i in range(count)))
        phase["sockets_connected"] = sum(s is not None for s in sockets)
        phase["connect_failures"] = dict(failures)
        phase["connect_s"] = round(time.monotonic() - started, 2)
        if not phase["sockets_connected"]:
            logs = "\n".join(server.log_tail() for server in servers)
            raise BenchFailed(f"{name}: no socket could connect to {path}: {dict(failures)}\n{logs}")
        if failures:
            self.say(f"{name}: {len(failures)} kind(s) of connect failure: {dict(failures)}")
        return targets

    async def open_member_socket(
        self,
        server: ServerProcess,
        session_id: str,
        path: str,
        room: int,
        *,
        wait_ready: bool = True,
        fast: bool = True,
    ) -> BenchSocket:
        """Open one socket as a signed-in user's browser tab would: its session cookie, the server's Origin."""
        return await open_socket(
            host="127.0.0.1",
            port=server.port,
            path=path,
            headers={
                "Origin": server.origin,
                "Cookie": f"{settings.SESSION_COOKIE_NAME}={session_id}",
                **({"Sec-WebSocket-Extensions": BROWSER_EXTENSIONS} if self.options.deflate else {}),
            },
            room=room,
            fast=fast,
            wait_ready=wait_ready,
            timeout=SOCKET_TIMEOUT,
        )

    def pick_senders(self, sockets: list, n_rooms: int) -> list[list[BenchSocket]]:
        """Per room, the open sockets among its first --senders."""
        senders = [[] for _ in range(n_rooms)]
        for i, sock in enumerate(sockets):
            room, j, _, _ = self.targets[i]
            if sock is not None and j < self.options.senders:
                senders[room].append(sock)
        return senders

    # -- steps -----------------------------------------------------------------------

    async def measure(
        self,
        phase: dict,
        servers,
        rooms,
        sockets: list,
        known_last_seq: list[int],
        tag: str,
        rate: float,
        duration: float,
    ) -> tuple[dict, StepRaw]:
        """Run one step: send at `rate` per room for `duration` s, then check it against the database."""
        senders = self.pick_senders(sockets, len(rooms))
        plan = StepPlan(
            rate=rate,
            duration=duration,
            senders=senders,
            sockets=[s for s in sockets if s is not None],
            rooms=len(rooms),
            nonce_prefix=f"{self.run_id}-{phase['name'][0]}{tag}-",
            first_number=self.number,
            body_size=self.options.body_size,
            drain=self.options.drain,
        )
        marks: dict = {"seconds": []}
        sampler = asyncio.get_running_loop().create_task(self.sample_every_second(servers, marks["seconds"]))
        try:
            raw = await run_step(
                plan,
                lambda: marks.update(start=report.usage_snapshot(servers), start_ns=time.time_ns()),
                lambda: marks.update(end=report.usage_snapshot(servers)),
            )
        finally:
            sampler.cancel()
        self.number += max(1, round(rate * duration)) * len(rooms)
        counts = await self.check_step(raw, rooms, known_last_seq)
        return report.step_figures(plan, raw, marks, servers, counts, self.options.p99_limit_ms), raw

    @staticmethod
    async def sample_every_second(servers, samples: list[dict]) -> None:
        """The servers' CPU once a second through a step, for its timeline."""
        while True:
            samples.append(report.usage_snapshot(servers))
            await asyncio.sleep(1.0)  # the timeline's resolution

    async def run_steps(self, phase: dict, servers, rooms, sockets: list) -> None:
        """Run the warm-up, then one step per rate (stopping at the first failure under --find-max)."""
        o = self.options
        name = phase["name"]
        phase["senders_per_room"] = [len(s) for s in self.pick_senders(sockets, len(rooms))]
        known_last_seq = [0] * len(rooms)  # fresh rooms
        if o.warmup > 0:
            # Not reported in the table: first database connections, thread pools, caches.
            phase["warmup"], _ = await self.measure(
                phase, servers, rooms, sockets, known_last_seq, "w", self.rates[0], o.warmup
            )
            self.say(f"{name}: warmed up ({o.warmup:g} s at {self.rates[0]:g} msg/s per room)")
            await asyncio.sleep(STEP_PAUSE)
        if o.idle > 0:
            start = report.usage_snapshot(servers)
            await asyncio.sleep(o.idle)  # the measurement window: every socket open, nothing sent
            phase["idle"] = report.idle_figures(start, report.usage_snapshot(servers), servers)
            self.say(f"{name}: {report.idle_line(phase['idle'])}")
        self.say(report.table_header(name))
        for step_no, rate in enumerate(self.rates):
            self.remaining(f"the {name} measurement")
            step, _ = await self.measure(phase, servers, rooms, sockets, known_last_seq, str(step_no), rate, o.duration)
            phase["steps"].append(step)
            self.say(report.table_row(step))
            if step["ok"]:
                phase["max_rate"] = rate if o.find_max else None
            elif o.find_max:
                self.say(f"{name}: stopped at {rate:g} msg/s per room: {'; '.join(step['fail_reasons'])}")
                break
            if step_no + 1 < len(self.rates):
                await asyncio.sleep(STEP_PAUSE)

    async def check_step(self, raw: StepRaw, rooms, known_last_seq: list[int]) -> Counter:
        """Count every socket's deliveries against what the database stored during the step."""
        counts: Counter[str] = Counter()
        for room, slug in enumerate(rooms):
            reader = await self.open_member_socket(
                self.reader, self.sessions[0].session_id, READER_WS_PATH.format(slug=slug), 0, fast=False
            )
            try:
                last_seq = (await asyncio.shield(reader.ready))["last_seq"]
                messages = await read_history(reader, last_seq, known_last_seq[room], timeout=SOCKET_TIMEOUT)
            finally:
                reader.close()
            seqs = [m["seq"] for m in messages]
            counts["seq_gaps"] += (last_seq - known_last_seq[room]) - len(set(seqs))
            known_last_seq[room] = last_seq
            step_numbers = set(raw.sent_numbers[room])
            stored_numbers: Counter[int] = Counter()
            for message in messages:
                parsed = parse_body(message.get("body") or "")
                if parsed is not None and parsed[1] in step_numbers:
                    stored_numbers[parsed[1]] += 1
                else:
                    counts["foreign"] += 1  # stored late from an earlier step, or not ours
            counts["stored_duplicates"] += sum(c - 1 for c in stored_numbers.values())
            stored_set = set(stored_numbers)
            counts["sent"] += len(raw.sent_numbers[room])
            counts["stored"] += len(stored_set)
            members = raw.open_at_start[room]
            counts["expected"] += len(stored_set) * len(members)
            counted = tally(stored_set, (raw.received[index] for index in members))
            counts["delivered"] += counted.delivered
            counts["lost"] += counted.lost
            counts["duplicates"] += counted.duplicates
            counts["stray"] += counted.stray
            counts["sockets_with_loss"] += counted.sockets_with_loss
        return counts

    # -- cleanup -------------------------------------------------------------------

    def stop_all(self) -> None:
        for server in self.servers:
            try:
                server.stop()
            except Exception:  # pragma: no cover - keep stopping the others
                server.kill()

    def kill_all(self) -> None:
        for server in list(self.servers):
            server.kill()

    def scan_logs(self, servers) -> dict:
        found = {}
        for server in servers:
            text = server.log_text()
            counts = {marker: text.count(marker) for marker in ("Traceback", "ERROR", "WARNING") if marker in text}
            if counts:
                found[server.name] = {**counts, "log": str(server.log_path)}
        return found


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def uvloop_factory():
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        return None
    return uvloop.new_event_loop
