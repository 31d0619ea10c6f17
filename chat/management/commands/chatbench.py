"""Measure the live chat end to end: real servers, real sign-ups, many sockets, one table.

    python manage.py chatbench [--sockets 200] [--rate 20] [--duration 10]
                               [--server uvicorn|daphne] [--processes 1] [--rooms 1]
                               [--senders 10]
                               [--find-max [--rates 10,20,...]] [--baseline]
                               [--json FILE|-] [--max-seconds 600]

Everything runs on 127.0.0.1 and stops by itself:

1. `manage.py migrate` on the bench database (`--database-url`, by default
   var/bench.sqlite3), then K server processes on free ports, configured like
   production (DEBUG off, Redis pub/sub layer under a per-run prefix).
2. Users sign up through the site's own forms (or log in when a rerun finds
   them), several sockets per user like browser tabs; the rooms are created
   through the room form, fresh slugs every run.
3. N sockets connect round-robin over the processes and wait for `ready`.
4. In each room, `--senders` of its sockets send `--rate` messages per second
   *per room* between them (each sender rate/senders), on a fixed schedule,
   for `--duration` seconds. Each body carries its send time, so every
   receiver measures one-way latency.
5. Once every socket has its messages (or 5 s after the last send), the stored
   messages are read back through the WebSocket `history` frame (that is, from
   the database) and every socket's deliveries are checked against them:
   missing and duplicated messages per socket, sends refused with an `error`
   frame, latency percentiles, deliveries per second, server CPU per 1,000
   deliveries (from /proc), peak RSS per server process, and the client's own
   CPU.

`--find-max` repeats the measurement at rising per-room rates on the same
servers and sockets and reports the highest rate with no loss, no duplicates,
no refused or unanswered sends, and p99 under 250 ms. `--baseline` then runs
the same measurement against `bench.tutorial_asgi:application` (a textbook
Channels consumer) and reports ours-over-baseline ratios.

A measurement that shows loss still exits 0; a setup failure (a server that
does not start, a sign-up that fails) raises CommandError with what to fix.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import math
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from html import unescape
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from bench.serverprocess import UVICORN_WS, ServerFailed, ServerProcess
from chat import benchclient
from chat.benchclient import (
    HandshakeError,
    StepPlan,
    StepRaw,
    open_socket,
    parse_body,
    percentile,
    read_history,
    run_step,
    tally,
)

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
CLK_TCK = os.sysconf("SC_CLK_TCK")


class OutOfTime(Exception):
    """--max-seconds ran out."""


# --------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------


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
            headers["Cookie"] = "; ".join(f"{name}={value}" for name, value in self.cookies.items())
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
            raise CommandError(f"GET {path} on {self.server.name} gave HTTP {status} without a CSRF token.")
        return match.group(1)

    def post_form(self, path: str, form: dict, token_from: str | None = None) -> tuple[int, str]:
        token = self.form_token(token_from or path)
        return self.request("POST", path, {"csrfmiddlewaretoken": token, **form})

    @property
    def session_id(self) -> str | None:
        return self.cookies.get(settings.SESSION_COOKIE_NAME)


def form_error(html: str) -> str:
    match = ERROR_ITEM.search(html)
    return unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip() if match else "no error message on the page"


def sign_in(server: ServerProcess, username: str, password: str, timeout: float) -> tuple[SiteSession, str]:
    """Sign up `username`, or log in when it exists already; returns the session and which it was."""
    site = SiteSession(server, timeout)
    status, html = site.post_form(
        "/accounts/signup/", {"username": username, "password1": password, "password2": password}
    )
    if status in (302, 303) and site.session_id:
        return site, "signed up"
    if status != 400 or "already exists" not in html:
        raise CommandError(
            f"Signing up {username!r} on {server.name} failed (HTTP {status}): {form_error(html)}\n{server.log_tail()}"
        )
    status, html = site.post_form("/accounts/login/", {"username": username, "password": password})
    if status in (302, 303) and site.session_id:
        return site, "logged in"
    raise CommandError(
        f"{username!r} exists in the bench database but logging in failed (HTTP {status}): "
        f"{form_error(html)}. It was probably made with another password: use a fresh --database-url "
        f"(or delete the bench database file) or another --user-prefix."
    )


def create_room(site: SiteSession, slug: str, name: str) -> None:
    status, html = site.post_form("/rooms/new/", {"name": name, "slug": slug, "topic": "chatbench"}, token_from="/")
    if status not in (302, 303):
        raise CommandError(
            f"Creating room {slug!r} on {site.server.name} failed (HTTP {status}): {form_error(html)}\n"
            f"{site.server.log_tail()}"
        )


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


def cpu_seconds_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_ticks() -> tuple[int, int] | None:
    """(busy, steal) clock ticks of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user and nice]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal, steal


def ratio(ours, theirs) -> float | None:
    if ours is None or theirs in (None, 0):
        return None
    return round(ours / theirs, 3)


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


class Command(BaseCommand):
    help = (
        "Benchmark the live chat: starts servers, signs users up, connects sockets, sends at a fixed rate "
        "and reports loss, duplicates, latency percentiles, deliveries/s and server CPU per 1,000 deliveries."
    )
    # It never touches this process's database: everything goes over HTTP and WebSockets.
    requires_system_checks = []

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--server",
            choices=[*UVICORN_WS, "daphne"],
            default="uvicorn",
            help=(
                "ASGI server: uvicorn as bin/serve runs it (websockets-sansio), uvicorn with the"
                " legacy websockets or wsproto protocol, or daphne (uvicorn)"
            ),
        )
        parser.add_argument("--processes", type=int, default=1, help="server processes, on separate ports (1)")
        parser.add_argument("--sockets", type=int, default=200, help="WebSockets in all, round-robin (200)")
        parser.add_argument("--rooms", type=int, default=1, help="rooms; the sockets are spread evenly (1)")
        parser.add_argument(
            "--senders", type=int, default=10, help="sockets per room that send; they share the room's rate (10)"
        )
        parser.add_argument("--rate", type=float, default=20.0, help="messages per second PER ROOM (20)")
        parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending per measurement (10)")
        parser.add_argument("--body-size", type=int, default=100, help="characters per message body (100)")
        parser.add_argument(
            "--database-url",
            default=f"sqlite:///{Path(settings.BASE_DIR) / 'var' / 'bench.sqlite3'}",
            help="the servers' database; migrated first (var/bench.sqlite3)",
        )
        parser.add_argument(
            "--find-max", action="store_true", help="step the rate up; report the highest rate that passes"
        )
        parser.add_argument("--rates", default=DEFAULT_RATES, help=f"per-room rates for --find-max ({DEFAULT_RATES})")
        parser.add_argument("--p99-limit-ms", type=float, default=250.0, help="the p99 a passing step stays under")
        parser.add_argument("--drain", type=float, default=5.0, help="longest wait for deliveries after the last send")
        parser.add_argument(
            "--warmup", type=float, default=1.0, help="seconds of unreported sending before the first step (1)"
        )
        parser.add_argument(
            "--baseline", action="store_true", help=f"measure {BASELINE_APP} the same way afterwards and compare"
        )
        parser.add_argument("--user-prefix", default="bench", help="usernames are PREFIX-u001, ... (bench)")
        parser.add_argument("--json", dest="json_path", metavar="FILE", help="write the report as JSON; - for stdout")
        parser.add_argument("--max-seconds", type=float, default=600.0, help="hard cap on the whole run (600)")

    # -- entry point -----------------------------------------------------------

    def handle(self, *args, **options) -> None:
        self.options = options
        self.check_options()
        self.started = time.monotonic()
        self.deadline = self.started + options["max_seconds"]
        self.run_id = time.strftime("%m%d%H%M%S") + secrets.token_hex(2)
        self.log_dir = Path(settings.BASE_DIR) / "var" / "bench-logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.servers: list[ServerProcess] = []
        self.number = 1  # message numbers, unique within the run
        self.report: dict = {
            "run_id": self.run_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": self.config(),
            "setup": {},
            "main": None,
            "baseline": None,
            "ratios": None,
            "aborted": None,
        }
        load = f"find-max over {options['rates']}" if options["find_max"] else f"{options['rate']:g} msg/s per room"
        self.say(
            f"chatbench {self.run_id}: {options['sockets']} sockets, {options['rooms']} room(s), "
            f"{options['server']} x{options['processes']}, {load}, "
            f"{options['duration']:g} s per measurement; logs in {self.log_dir}"
        )
        # The hard cap: whatever hangs, the servers die a little after the deadline.
        watchdog = threading.Timer(options["max_seconds"] + 15, self.kill_all)
        watchdog.daemon = True
        watchdog.start()
        previous_term = None
        if threading.current_thread() is threading.main_thread():
            previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        failure: BaseException | None = None
        try:
            self.run()
        except OutOfTime as error:
            self.report["aborted"] = f"--max-seconds ({options['max_seconds']:g}) ran out {error}"
            self.say(f"ABORTED: {self.report['aborted']}; reporting what was measured.")
        except KeyboardInterrupt:
            self.report["aborted"] = "interrupted"
            failure = CommandError("Interrupted (Ctrl-C or SIGTERM); every server was stopped.", returncode=130)
        except CommandError as error:
            failure = error
            self.report["aborted"] = f"setup failed: {str(error).splitlines()[0]}"
        finally:
            watchdog.cancel()
            self.stop_all()
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        measured = bool(self.report["main"] and self.report["main"]["steps"])
        if measured or failure is None:
            self.finish_report()
        if failure is None and not measured:
            failure = CommandError(f"Nothing was measured: {self.report['aborted']}. Raise --max-seconds.")
        if failure is not None:
            raise failure

    def check_options(self) -> None:
        o = self.options
        for name in ("processes", "sockets", "rooms", "senders"):
            if o[name] < 1:
                raise CommandError(f"--{name} must be at least 1.")
        if o["sockets"] < o["rooms"]:
            raise CommandError("--sockets must be at least --rooms: every room needs a socket.")
        if o["rate"] <= 0 or o["duration"] <= 0:
            raise CommandError("--rate and --duration must be positive.")
        try:
            self.rates = [float(r) for r in o["rates"].split(",") if r.strip()] if o["find_max"] else [o["rate"]]
        except ValueError:
            raise CommandError(f"--rates must be comma-separated numbers, not {o['rates']!r}.") from None
        if not self.rates or min(self.rates) <= 0:
            raise CommandError("--rates needs at least one positive rate.")
        if o["baseline"] and importlib.util.find_spec(BASELINE_APP.split(":")[0]) is None:
            raise CommandError(
                f"--baseline needs the module {BASELINE_APP.split(':')[0]} (bench/tutorial_asgi.py), "
                "which was not found."
            )
        if o["database_url"].startswith("sqlite:///"):
            Path(o["database_url"][len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)

    def config(self) -> dict:
        o = self.options
        return {
            "server": o["server"],
            "processes": o["processes"],
            "sockets": o["sockets"],
            "rooms": o["rooms"],
            "senders_per_room": o["senders"],
            "rate_per_room": None if o["find_max"] else o["rate"],
            "rates": self.rates if o["find_max"] else None,
            "duration_s": o["duration"],
            "body_size": o["body_size"],
            "find_max": o["find_max"],
            "baseline": o["baseline"],
            "p99_limit_ms": o["p99_limit_ms"],
            "drain_s": o["drain"],
            "warmup_s": o["warmup"],
            "database_url": o["database_url"],
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
        }

    # -- the run ---------------------------------------------------------------

    def run(self) -> None:
        o = self.options
        self.env = self.server_env()
        started = time.monotonic()
        self.migrate()
        self.report["setup"]["migrate_s"] = round(time.monotonic() - started, 1)

        started = time.monotonic()
        main_servers = self.start_servers("main", MAIN_APP, o["processes"])
        self.report["setup"]["servers_up_s"] = round(time.monotonic() - started, 1)
        self.sessions = self.sign_in_users(main_servers)
        self.reader = main_servers[0]  # serves `history` reads for both phases
        rooms = self.create_rooms("m")
        loop_factory = _uvloop_factory()
        self.report["config"]["client_loop"] = "uvloop" if loop_factory else "asyncio"
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            self.report["main"] = self.new_phase("main", MAIN_APP, main_servers, rooms, MAIN_WS_PATH)
            self.run_phase(runner, self.report["main"], main_servers, rooms, MAIN_WS_PATH, expect_ready=True)
            if not o["baseline"]:
                return
            # Only the reader stays up (idle but for `history` reads; its CPU is not counted).
            for server in main_servers[1:]:
                server.stop()
            base_servers = self.start_servers("baseline", BASELINE_APP, o["processes"])
            base_rooms = self.create_rooms("b")
            self.report["baseline"] = self.new_phase(
                "baseline", BASELINE_APP, base_servers, base_rooms, BASELINE_WS_PATH
            )
            self.run_phase(
                runner, self.report["baseline"], base_servers, base_rooms, BASELINE_WS_PATH, expect_ready=False
            )
            for server in base_servers:
                server.stop()

    def remaining(self, stage: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OutOfTime(f"during {stage}")
        return left

    def say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def server_env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(
            # SETTINGS_MODULE is None while settings are overridden (in tests).
            DJANGO_SETTINGS_MODULE=settings.SETTINGS_MODULE or os.environ["DJANGO_SETTINGS_MODULE"],
            DATABASE_URL=self.options["database_url"],
            SECRET_KEY=BENCH_SECRET_KEY,
            DEBUG="0",
            ALLOWED_HOSTS="127.0.0.1,localhost",
            CHANNEL_LAYER="redis",
            CHANNEL_LAYER_PREFIX=f"bench-{self.run_id}",
            REDIS_URL=settings.REDIS_URL,
            # A benchmark sends faster, and opens more sockets per user, than the limits allow people.
            CHAT_MESSAGE_RATE_LIMIT="1000000",
            CHAT_MAX_SOCKETS_PER_USER="100000",
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("LOG_LEVEL", "WARNING")
        return env

    def migrate(self) -> None:
        self.say(f"migrate: {self.options['database_url']}")
        try:
            done = subprocess.run(
                [sys.executable, "manage.py", "migrate", "--noinput"],
                cwd=settings.BASE_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=min(180.0, self.remaining("migrate")),
            )
        except subprocess.TimeoutExpired:
            raise CommandError("manage.py migrate on the bench database did not finish in time.") from None
        if done.returncode != 0:
            raise CommandError(
                f"manage.py migrate on {self.options['database_url']} failed (exit {done.returncode}); "
                f"check --database-url.\n{(done.stdout + done.stderr)[-1500:]}"
            )

    def start_servers(self, phase: str, app: str, count: int) -> list[ServerProcess]:
        kind = self.options["server"]
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
                    raise CommandError(str(error)) from None
        ports = ", ".join(f"{s.port} (pid {s.proc.pid})" for s in new)
        self.say(f"{phase}: {count} x {kind} {app} up on {ports}")
        return new

    def sign_in_users(self, servers: list[ServerProcess]) -> list[SiteSession]:
        o = self.options
        count = math.ceil(o["sockets"] / MAX_SOCKETS_PER_USER)
        names = [f"{o['user_prefix']}-u{i + 1:03d}" for i in range(count)]
        self.say(f"users: signing in {count} ({MAX_SOCKETS_PER_USER} sockets per user at most; ~0.4 s of hashing each)")
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
        slugs = [f"bench-{self.run_id}-{tag}{n + 1}" for n in range(self.options["rooms"])]
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
            "server": self.options["server"],
            "processes": len(servers),
            "pids": [s.proc.pid for s in servers],
            "ws_path": path,
            "rooms": rooms,
            "sockets_requested": self.options["sockets"],
            "sockets_connected": 0,
            "connect_failures": {},
            "connect_s": None,
            "steps": [],
            "max_rate": None,
            "warmup": None,
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

    # -- measuring (async) -----------------------------------------------------

    async def measure_phase(self, phase: dict, servers, rooms, path: str, expect_ready: bool) -> None:
        sockets: list[benchclient.BenchSocket | None] = [None] * self.options["sockets"]
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
        """Fill `sockets` (None where a connect failed); returns each one's (room, j, server, session id)."""
        o = self.options
        name = phase["name"]
        count = o["sockets"]
        n_rooms = len(rooms)
        cookie_name = settings.SESSION_COOKIE_NAME
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
                    sockets[i] = await open_socket(
                        host="127.0.0.1",
                        port=server.port,
                        path=path.format(slug=rooms[room]),
                        headers={"Origin": server.origin, "Cookie": f"{cookie_name}={sid}"},
                        room=room,
                        wait_ready=expect_ready,
                        timeout=SOCKET_TIMEOUT,
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
            raise CommandError(f"{name}: no socket could connect to {path}: {dict(failures)}\n{logs}")
        if failures:
            self.say(f"{name}: {len(failures)} kind(s) of connect failure: {dict(failures)}")
        return targets

    def pick_senders(self, sockets: list, n_rooms: int) -> list[list[benchclient.BenchSocket]]:
        """Per room, the open sockets among its first --senders."""
        senders = [[] for _ in range(n_rooms)]
        for i, sock in enumerate(sockets):
            room, j, _, _ = self.targets[i]
            if sock is not None and j < self.options["senders"]:
                senders[room].append(sock)
        return senders

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
        """One step: send at `rate` per room for `duration` s, then check it against the database."""
        senders = self.pick_senders(sockets, len(rooms))
        plan = StepPlan(
            rate=rate,
            duration=duration,
            senders=senders,
            sockets=[s for s in sockets if s is not None],
            rooms=len(rooms),
            nonce_prefix=f"{self.run_id}-{phase['name'][0]}{tag}-",
            first_number=self.number,
            body_size=self.options["body_size"],
            drain=self.options["drain"],
        )
        marks: dict = {}
        raw = await run_step(
            plan,
            lambda: marks.update(start=self.usage_snapshot(servers)),
            lambda: marks.update(end=self.usage_snapshot(servers)),
        )
        self.number += max(1, round(rate * duration)) * len(rooms)
        return await self.check_step(plan, raw, marks, servers, rooms, known_last_seq), raw

    async def run_steps(self, phase: dict, servers, rooms, sockets: list) -> None:
        """The warm-up, then one step per rate (stopping at the first failure under --find-max)."""
        o = self.options
        name = phase["name"]
        phase["senders_per_room"] = [len(s) for s in self.pick_senders(sockets, len(rooms))]
        known_last_seq = [0] * len(rooms)  # fresh rooms
        if o["warmup"] > 0:
            # Not reported in the table: first database connections, thread pools, caches.
            phase["warmup"], _ = await self.measure(
                phase, servers, rooms, sockets, known_last_seq, "w", self.rates[0], o["warmup"]
            )
            self.say(f"{name}: warmed up ({o['warmup']:g} s at {self.rates[0]:g} msg/s per room)")
            await asyncio.sleep(STEP_PAUSE)
        self.say(self.table_header(name))
        for step_no, rate in enumerate(self.rates):
            self.remaining(f"the {name} measurement")
            step, _ = await self.measure(
                phase, servers, rooms, sockets, known_last_seq, str(step_no), rate, o["duration"]
            )
            phase["steps"].append(step)
            self.say(self.table_row(step))
            if step["ok"]:
                phase["max_rate"] = rate if o["find_max"] else None
            elif o["find_max"]:
                self.say(f"{name}: stopped at {rate:g} msg/s per room: {'; '.join(step['fail_reasons'])}")
                break
            if step_no + 1 < len(self.rates):
                await asyncio.sleep(STEP_PAUSE)

    def usage_snapshot(self, servers) -> dict:
        return {
            "time": time.perf_counter(),
            "servers": [s.cpu_ticks() for s in servers],
            "client": cpu_seconds_self(),
            "machine": machine_ticks(),
        }

    async def check_step(self, plan: StepPlan, raw, marks: dict, servers, rooms, known_last_seq: list[int]) -> dict:
        """Compare every socket's deliveries with what the database stored during the step."""
        cookie = f"{settings.SESSION_COOKIE_NAME}={self.sessions[0].session_id}"
        sent = stored = expected = delivered = lost = duplicates = stray = 0
        seq_gaps = stored_duplicates = foreign = 0
        sockets_with_loss = 0
        for room, slug in enumerate(rooms):
            reader = await open_socket(
                host="127.0.0.1",
                port=self.reader.port,
                path=READER_WS_PATH.format(slug=slug),
                headers={"Origin": self.reader.origin, "Cookie": cookie},
                fast=False,
                timeout=SOCKET_TIMEOUT,
            )
            try:
                last_seq = (await asyncio.shield(reader.ready))["last_seq"]
                messages = await read_history(reader, last_seq, known_last_seq[room], timeout=SOCKET_TIMEOUT)
            finally:
                reader.close()
            seqs = [m["seq"] for m in messages]
            seq_gaps += (last_seq - known_last_seq[room]) - len(set(seqs))
            known_last_seq[room] = last_seq
            step_numbers = set(raw.sent_numbers[room])
            stored_numbers: Counter[int] = Counter()
            for message in messages:
                parsed = parse_body(message.get("body") or "")
                if parsed is not None and parsed[1] in step_numbers:
                    stored_numbers[parsed[1]] += 1
                else:
                    foreign += 1  # stored late from an earlier step, or not ours
            stored_duplicates += sum(c - 1 for c in stored_numbers.values())
            stored_set = set(stored_numbers)
            sent += len(raw.sent_numbers[room])
            stored += len(stored_set)
            members = raw.open_at_start[room]
            expected += len(stored_set) * len(members)
            counted = tally(stored_set, (raw.received[index] for index in members))
            delivered += counted.delivered
            lost += counted.lost
            duplicates += counted.duplicates
            stray += counted.stray
            sockets_with_loss += counted.sockets_with_loss

        latencies = sorted(raw.recorder.latencies_ns)
        ms = lambda ns: None if ns is None else round(ns / 1e6, 2)  # noqa: E731
        start, end = marks["start"], marks["end"]
        window = end["time"] - start["time"]
        server_ticks = [
            (b - a) if a is not None and b is not None else None
            for a, b in zip(start["servers"], end["servers"], strict=True)
        ]
        server_cpu_ms = sum(t for t in server_ticks if t is not None) * 1000 / CLK_TCK
        client_cpu_ms = (end["client"] - start["client"]) * 1000
        per_1k = lambda cpu: round(cpu / (delivered / 1000), 2) if delivered else None  # noqa: E731
        errors = dict(raw.recorder.errors)
        errors_total = sum(errors.values())
        closed = Counter(str(code) for code in raw.close_codes.values())
        step = {
            "rate_per_room": plan.rate,
            "rate_total": plan.rate * plan.rooms,
            "sockets": sum(len(m) for m in raw.open_at_start),
            "senders": sum(len(s) for s in plan.senders),
            "send_window_s": round(raw.send_window_s, 3),
            "window_s": round(window, 3),
            "drained": raw.drained,
            "sent": sent,
            "not_sent": raw.not_sent,
            "stored": stored,
            "send_errors": errors_total,
            "send_errors_by_code": errors,
            "unanswered": sent - stored - errors_total,
            "expected": expected,
            "delivered": delivered,
            "lost": lost,
            "duplicates": duplicates,
            "stray": stray,
            "sockets_with_loss": sockets_with_loss,
            "sockets_closed": sum(closed.values()),
            "close_codes": dict(closed),
            "seq_gaps": seq_gaps,
            "stored_duplicates": stored_duplicates,
            "stored_not_of_this_step": foreign,
            "latency_samples": len(latencies),
            "p50_ms": ms(percentile(latencies, 0.50)),
            "p95_ms": ms(percentile(latencies, 0.95)),
            "p99_ms": ms(percentile(latencies, 0.99)),
            "max_ms": ms(latencies[-1] if latencies else None),
            "deliveries_per_s": round(delivered / raw.send_window_s, 1),
            # Over the whole window, drain included: lower than the above when the server lags.
            "deliveries_per_s_incl_drain": round(delivered / window, 1),
            "server_cpu_ms": round(server_cpu_ms, 1),
            "server_cpu_ms_per_1k": per_1k(server_cpu_ms),
            "server_cpu_pct": round(100 * server_cpu_ms / 1000 / window, 1),
            "server_cpu_pct_by_process": [
                None if t is None else round(100 * t / CLK_TCK / window, 1) for t in server_ticks
            ],
            "server_peak_rss_mib": [s.peak_rss_mib() for s in servers],
            "client_cpu_ms": round(client_cpu_ms, 1),
            "client_cpu_ms_per_1k": per_1k(client_cpu_ms),
            "client_cpu_pct": round(100 * client_cpu_ms / 1000 / window, 1),
            # Steadier than either figure alone on a machine whose speed drifts between runs.
            "server_to_client_cpu": round(server_cpu_ms / client_cpu_ms, 2) if client_cpu_ms > 0 else None,
            "client_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "max_send_lag_ms": round(raw.max_send_lag_ms, 1),
        }
        if start["machine"] and end["machine"]:
            # Whatever else ran meanwhile (a noisy neighbour makes every figure above worse).
            busy_ms = (end["machine"][0] - start["machine"][0]) * 1000 / CLK_TCK
            steal_ms = (end["machine"][1] - start["machine"][1]) * 1000 / CLK_TCK
            step["machine_cpu_pct"] = round(100 * busy_ms / 1000 / window, 1)
            step["other_cpu_pct"] = max(0.0, round(100 * (busy_ms - server_cpu_ms - client_cpu_ms) / 1000 / window, 1))
            step["steal_pct"] = round(100 * steal_ms / 1000 / window, 1)
        reasons = []
        if step["lost"]:
            reasons.append(f"{step['lost']} lost on {sockets_with_loss} socket(s)")
        if step["duplicates"]:
            reasons.append(f"{step['duplicates']} duplicates")
        if errors_total:
            reasons.append(f"{errors_total} sends refused {errors}")
        if step["unanswered"] > 0 or step["not_sent"]:
            reasons.append(f"{step['unanswered'] + step['not_sent']} sends neither stored nor refused")
        if step["sockets_closed"]:
            reasons.append(f"{step['sockets_closed']} socket(s) closed {dict(closed)}")
        if not delivered:
            reasons.append("nothing delivered")
        elif step["p99_ms"] is None or step["p99_ms"] >= self.options["p99_limit_ms"]:
            reasons.append(f"p99 {step['p99_ms']} ms >= {self.options['p99_limit_ms']:g} ms")
        step["ok"] = not reasons
        step["fail_reasons"] = reasons
        return step

    # -- cleanup ---------------------------------------------------------------

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

    # -- the report ------------------------------------------------------------

    COLUMNS = [
        ("rate/room", "rate_per_room", "g", 9),
        ("sent", "sent", "d", 6),
        ("stored", "stored", "d", 6),
        ("refused", "send_errors", "d", 7),
        ("expected", "expected", "d", 9),
        ("delivered", "delivered", "d", 9),
        ("lost", "lost", "d", 5),
        ("dup", "duplicates", "d", 4),
        ("p50 ms", "p50_ms", ".1f", 7),
        ("p95 ms", "p95_ms", ".1f", 7),
        ("p99 ms", "p99_ms", ".1f", 7),
        ("deliv/s", "deliveries_per_s", ".0f", 8),
        ("srv ms/1k", "server_cpu_ms_per_1k", ".1f", 9),
        ("srv CPU%", "server_cpu_pct", ".0f", 8),
        ("cli ms/1k", "client_cpu_ms_per_1k", ".1f", 9),
        ("cli CPU%", "client_cpu_pct", ".0f", 8),
        ("srv RSS MiB", "server_peak_rss_mib", "", 11),
        ("other%", "other_cpu_pct", ".0f", 6),
        ("ok", "ok", "", 3),
    ]

    def table_header(self, name: str) -> str:
        title = " ".join(f"{label:>{width}}" for label, _, _, width in self.COLUMNS)
        return f"{name}:\n{title}"

    def table_row(self, step: dict) -> str:
        cells = []
        for _, key, spec, width in self.COLUMNS:
            value = step.get(key)
            if key == "server_peak_rss_mib":
                text = "/".join(fmt(v, ".0f") for v in value)
            else:
                text = fmt(value, spec)
            cells.append(f"{text:>{width}}")
        return " ".join(cells)

    def summary_step(self, phase: dict | None) -> dict | None:
        """The step a phase is summed up by: its best passing step under --find-max, else its last."""
        if not phase or not phase["steps"]:
            return None
        if self.options["find_max"]:
            passing = [s for s in phase["steps"] if s["ok"]]
            if passing:
                return passing[-1]
        return phase["steps"][-1]

    def finish_report(self) -> None:
        report = self.report
        main = report["main"]
        base = report["baseline"]
        summary = self.summary_step(main)
        for key in (
            "sent", "stored", "send_errors", "expected", "delivered", "lost", "duplicates",
            "p50_ms", "p95_ms", "p99_ms", "deliveries_per_s", "server_cpu_ms_per_1k", "server_cpu_pct",
            "client_cpu_ms_per_1k", "client_cpu_pct", "server_peak_rss_mib", "ok",
        ):  # fmt: skip
            report[key] = summary.get(key) if summary else None
        report["sockets_connected"] = main["sockets_connected"] if main else 0
        report["max_rate"] = main["max_rate"] if main else None
        if main and base and base["steps"]:
            report["ratios"] = self.ratios(main, base)

        lines = ["", f"chatbench {report['run_id']} — {report['elapsed_s']} s in all"]
        for phase in (main, base):
            if not phase:
                continue
            lines.append(
                f"{phase['name']}: {phase['app']} on {phase['server']} x{phase['processes']}, "
                f"{phase['sockets_connected']}/{phase['sockets_requested']} sockets connected in "
                f"{fmt(phase['connect_s'])} s, {len(phase['rooms'])} room(s), "
                f"senders per room {phase.get('senders_per_room')}"
            )
            lines.append(self.table_header("  steps"))
            lines.extend(self.table_row(step) for step in phase["steps"])
            for step in phase["steps"]:
                if not step["ok"]:
                    lines.append(
                        f"  {step['rate_per_room']:g} msg/s per room failed: {'; '.join(step['fail_reasons'])}"
                    )
            if self.options["find_max"]:
                lines.append(f"  max rate with no loss and p99 < {self.options['p99_limit_ms']:g} ms: "
                             f"{fmt(phase['max_rate'], 'g')} msg/s per room")  # fmt: skip
            if phase["log_warnings"]:
                lines.append(f"  server logs with warnings: {phase['log_warnings']}")
        if report["ratios"]:
            r = report["ratios"]
            inverse = f" (baseline {1 / r['server_cpu_per_1k']:.1f}x ours)" if r["server_cpu_per_1k"] else ""
            lines.append(
                f"ours / baseline at {fmt(r['at_rate_per_room'], 'g')} msg/s per room"
                f"{'' if r['both_passed'] else ' (not passed by both)'}: "
                f"server CPU per 1k deliveries {fmt(r['server_cpu_per_1k'])}{inverse}, p99 {fmt(r['p99'])}"
                + (f"; max rate {fmt(r['max_rate'])}" if self.options["find_max"] else "")
            )
        if report["aborted"]:
            lines.append(f"ABORTED: {report['aborted']}")
        self.say("\n".join(lines))

        path = self.options.get("json_path")
        if path and path != "-":
            Path(path).write_text(json.dumps(report, indent=2) + "\n")
            self.say(f"JSON report: {path}")
        elif path == "-":
            self.stdout.write(json.dumps(report))

    def ratios(self, main: dict, base: dict) -> dict:
        # Compare at the highest rate both passed; failing that, the lowest rate both measured.
        ours = {s["rate_per_room"]: s for s in main["steps"]}
        theirs = {s["rate_per_room"]: s for s in base["steps"]}
        common = sorted(set(ours) & set(theirs))
        both_ok = [r for r in common if ours[r]["ok"] and theirs[r]["ok"]]
        at = both_ok[-1] if both_ok else (common[0] if common else None)
        a, b = (ours[at], theirs[at]) if at is not None else ({}, {})
        return {
            "at_rate_per_room": at,
            "both_passed": bool(both_ok),
            "server_cpu_per_1k": ratio(a.get("server_cpu_ms_per_1k"), b.get("server_cpu_ms_per_1k")),
            "p99": ratio(a.get("p99_ms"), b.get("p99_ms")),
            "max_rate": ratio(main["max_rate"], base["max_rate"]) if self.options["find_max"] else None,
            "ours_server_cpu_ms_per_1k": a.get("server_cpu_ms_per_1k"),
            "baseline_server_cpu_ms_per_1k": b.get("server_cpu_ms_per_1k"),
            "ours_p99_ms": a.get("p99_ms"),
            "baseline_p99_ms": b.get("p99_ms"),
            "ours_max_rate": main["max_rate"],
            "baseline_max_rate": base["max_rate"],
        }


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _uvloop_factory():
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in requirements.txt
        return None
    return uvloop.new_event_loop
