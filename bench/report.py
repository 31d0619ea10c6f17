"""The benchmark's figures: latency percentiles, CPU and RSS from /proc, the printed table and the JSON report."""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.client import StepPlan, StepRaw
from bench.serverprocess import ServerProcess

CLK_TCK = os.sysconf("SC_CLK_TCK")
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
SUMMARY_KEYS = (
    "sent", "stored", "send_errors", "expected", "delivered", "lost", "duplicates",
    "p50_ms", "p95_ms", "p99_ms", "deliveries_per_s", "server_cpu_ms_per_1k", "server_cpu_pct",
    "client_cpu_ms_per_1k", "client_cpu_pct", "server_peak_rss_mib", "ok",
)  # fmt: skip


def percentile(sorted_values: Sequence, fraction: float):
    """Return the nearest-rank percentile of an already sorted sequence (None when empty)."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values), max(1, math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


# --------------------------------------------------------------------------
# CPU and memory
# --------------------------------------------------------------------------


def cpu_seconds_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


LOOP_STEPS = 2_000_000


def python_loop_ms() -> float:
    """Milliseconds this machine takes for a plain Python loop (best of 3): a yardstick for comparing runs."""
    best = float("inf")
    for _ in range(3):
        started, total = time.perf_counter(), 0
        for i in range(LOOP_STEPS):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def machine_ticks() -> tuple[int, int] | None:
    """Return the (busy, steal) clock ticks of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user and nice]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal, steal


def usage_snapshot(servers: Sequence[ServerProcess]) -> dict:
    """Take the clock and the CPU used so far by the servers, this client and the machine."""
    return {
        "time": time.perf_counter(),
        "servers": [s.cpu_ticks() for s in servers],
        "client": cpu_seconds_self(),
        "machine": machine_ticks(),
    }


def proc_status(pid: int) -> dict[str, int]:
    """Return the threads, RSS (KiB) and open file descriptors of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "threads": int(fields["Threads"]),
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
    }


def server_ticks(start: dict, end: dict) -> list[int | None]:
    """Each server's CPU clock ticks between two usage snapshots (None where one could not be read)."""
    return [
        (b - a) if a is not None and b is not None else None
        for a, b in zip(start["servers"], end["servers"], strict=True)
    ]


def idle_figures(start: dict, end: dict, servers: Sequence[ServerProcess]) -> dict:
    """The servers' and this client's CPU between two snapshots with no message sent, and the servers' RSS."""
    window = end["time"] - start["time"]
    server_ms = sum(t for t in server_ticks(start, end) if t is not None) * 1000 / CLK_TCK
    return {
        "seconds": round(window, 1),
        "server_cpu_pct": round(100 * server_ms / 1000 / window, 2),
        "client_cpu_pct": round(100 * (end["client"] - start["client"]) / window, 2),
        "server_rss_mib": [s.peak_rss_mib() for s in servers],
    }


def idle_line(idle: dict) -> str:
    return (
        f"idle {idle['seconds']:g} s (sockets open, nothing sent): servers {idle['server_cpu_pct']:.1f}% of a core, "
        f"client {idle['client_cpu_pct']:.1f}%, server peak RSS {idle['server_rss_mib']} MiB"
    )


# --------------------------------------------------------------------------
# One step's figures
# --------------------------------------------------------------------------


def step_figures(
    plan: StepPlan, raw: StepRaw, marks: dict, servers: Sequence[ServerProcess], counts: Counter, p99_limit_ms: float
) -> dict:
    """Turn one step's checked counts, latencies and CPU marks into its row of the report."""
    delivered = counts["delivered"]
    latencies = sorted(raw.recorder.latencies_ns)
    ms = lambda ns: None if ns is None else round(ns / 1e6, 2)  # noqa: E731
    start, end = marks["start"], marks["end"]
    window = end["time"] - start["time"]
    ticks = server_ticks(start, end)
    server_cpu_ms = sum(t for t in ticks if t is not None) * 1000 / CLK_TCK
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
        "sent": counts["sent"],
        "not_sent": raw.not_sent,
        "stored": counts["stored"],
        "send_errors": errors_total,
        "send_errors_by_code": errors,
        "unanswered": counts["sent"] - counts["stored"] - errors_total,
        "expected": counts["expected"],
        "delivered": delivered,
        "lost": counts["lost"],
        "duplicates": counts["duplicates"],
        "stray": counts["stray"],
        "sockets_with_loss": counts["sockets_with_loss"],
        "sockets_closed": sum(closed.values()),
        "close_codes": dict(closed),
        "seq_gaps": counts["seq_gaps"],
        "stored_duplicates": counts["stored_duplicates"],
        "stored_not_of_this_step": counts["foreign"],
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
        "server_cpu_pct_by_process": [None if t is None else round(100 * t / CLK_TCK / window, 1) for t in ticks],
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
    step["timeline"] = timeline(raw, marks)
    reasons = fail_reasons(step, errors, closed, p99_limit_ms)
    step["ok"] = not reasons
    step["fail_reasons"] = reasons
    return step


def timeline(raw: StepRaw, marks: dict) -> list[dict]:
    """Per second of the step, by send time: deliveries, p50 / p99 / max latency, and the servers' CPU.

    A stall shows as a second whose max and p99 jump while its CPU does not.
    """
    recorder = raw.recorder
    start_ns = marks.get("start_ns")
    if recorder is None or start_ns is None:
        return []
    by_second: dict[int, list[int]] = {}
    for sent_ns, latency_ns in zip(recorder.sent_ns, recorder.latencies_ns, strict=True):
        by_second.setdefault(max(0, (sent_ns - start_ns) // 1_000_000_000), []).append(latency_ns)
    samples = marks.get("seconds", [])
    rows = []
    for second in sorted(by_second):
        latencies = sorted(by_second[second])
        row = {
            "second": second,
            "deliveries": len(latencies),
            "p50_ms": round(percentile(latencies, 0.50) / 1e6, 1),
            "p99_ms": round(percentile(latencies, 0.99) / 1e6, 1),
            "max_ms": round(latencies[-1] / 1e6, 1),
        }
        if second + 1 < len(samples):
            a, b = samples[second], samples[second + 1]
            ticks = sum(
                y - x for x, y in zip(a["servers"], b["servers"], strict=True) if x is not None and y is not None
            )
            row["server_cpu_pct"] = round(100 * ticks / CLK_TCK / (b["time"] - a["time"]), 1)
        rows.append(row)
    return rows


def render_timeline(phase: dict) -> str:
    """The per-second rows of each step of a phase (chatbench --timeline)."""
    lines = []
    for step in phase.get("steps", []):
        lines.append(f"  {step['rate_per_room']:g} msg/s per room, per second by send time:")
        lines.append("    second  deliveries  p50 ms  p99 ms  max ms  srv CPU%")
        for row in step.get("timeline", []):
            cpu = row.get("server_cpu_pct")
            lines.append(
                f"    {row['second']:>6}  {row['deliveries']:>10}  {row['p50_ms']:>6}  {row['p99_ms']:>6}"
                f"  {row['max_ms']:>6}  {'' if cpu is None else cpu:>8}"
            )
    return "\n".join(lines)


def fail_reasons(step: dict, errors: dict, closed: Counter, p99_limit_ms: float) -> list[str]:
    """Return why a step does not pass: loss, duplicates, refused or unanswered sends, closes, or a slow p99."""
    reasons = []
    if step["lost"]:
        reasons.append(f"{step['lost']} lost on {step['sockets_with_loss']} socket(s)")
    if step["duplicates"]:
        reasons.append(f"{step['duplicates']} duplicates")
    if step["send_errors"]:
        reasons.append(f"{step['send_errors']} sends refused {errors}")
    if step["unanswered"] > 0 or step["not_sent"]:
        reasons.append(f"{step['unanswered'] + step['not_sent']} sends neither stored nor refused")
    if step["sockets_closed"]:
        reasons.append(f"{step['sockets_closed']} socket(s) closed {dict(closed)}")
    if not step["delivered"]:
        reasons.append("nothing delivered")
    elif step["p99_ms"] is None or step["p99_ms"] >= p99_limit_ms:
        reasons.append(f"p99 {step['p99_ms']} ms >= {p99_limit_ms:g} ms")
    return reasons


# --------------------------------------------------------------------------
# The table and the whole report
# --------------------------------------------------------------------------


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


def table_header(name: str) -> str:
    title = " ".join(f"{label:>{width}}" for label, _, _, width in COLUMNS)
    return f"{name}:\n{title}"


def table_row(step: dict) -> str:
    cells = []
    for _, key, spec, width in COLUMNS:
        value = step.get(key)
        if key == "server_peak_rss_mib":
            text = "/".join(fmt(v, ".0f") for v in value)
        else:
            text = fmt(value, spec)
        cells.append(f"{text:>{width}}")
    return " ".join(cells)


def summary_step(phase: dict | None, *, find_max: bool) -> dict | None:
    """Return the step a phase is summed up by: its best passing step under --find-max, else its last."""
    if not phase or not phase["steps"]:
        return None
    if find_max:
        passing = [s for s in phase["steps"] if s["ok"]]
        if passing:
            return passing[-1]
    return phase["steps"][-1]


def ratios(main: dict, base: dict, *, find_max: bool) -> dict:
    """Compare ours with the baseline at the highest rate both passed; failing that, the lowest both measured."""
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
        "max_rate": ratio(main["max_rate"], base["max_rate"]) if find_max else None,
        "ours_server_cpu_ms_per_1k": a.get("server_cpu_ms_per_1k"),
        "baseline_server_cpu_ms_per_1k": b.get("server_cpu_ms_per_1k"),
        "ours_p99_ms": a.get("p99_ms"),
        "baseline_p99_ms": b.get("p99_ms"),
        "ours_max_rate": main["max_rate"],
        "baseline_max_rate": base["max_rate"],
    }


def finish(report: dict, *, find_max: bool) -> None:
    """Fill in the report's summary figures and the ours-over-baseline ratios."""
    main = report["main"]
    base = report["baseline"]
    summary = summary_step(main, find_max=find_max)
    for key in SUMMARY_KEYS:
        report[key] = summary.get(key) if summary else None
    report["sockets_connected"] = main["sockets_connected"] if main else 0
    report["max_rate"] = main["max_rate"] if main else None
    if main and base and base["steps"]:
        report["ratios"] = ratios(main, base, find_max=find_max)


def render(report: dict, *, find_max: bool, p99_limit_ms: float, timelines: bool = False) -> str:
    """Return the printed report: each phase's table (and timelines), why steps failed, and the ratios."""
    lines = ["", f"chatbench {report['run_id']} — {report['elapsed_s']} s in all"]
    for phase in (report["main"], report["baseline"]):
        if not phase:
            continue
        lines.append(
            f"{phase['name']}: {phase['app']} on {phase['server']} x{phase['processes']}, "
            f"{phase['sockets_connected']}/{phase['sockets_requested']} sockets connected in "
            f"{fmt(phase['connect_s'])} s, {len(phase['rooms'])} room(s), "
            f"senders per room {phase.get('senders_per_room')}"
        )
        if phase.get("idle"):
            lines.append(f"  {idle_line(phase['idle'])}")
        lines.append(table_header("  steps"))
        lines.extend(table_row(step) for step in phase["steps"])
        for step in phase["steps"]:
            if not step["ok"]:
                lines.append(f"  {step['rate_per_room']:g} msg/s per room failed: {'; '.join(step['fail_reasons'])}")
        if find_max:
            lines.append(
                f"  max rate with no loss and p99 < {p99_limit_ms:g} ms: {fmt(phase['max_rate'], 'g')} msg/s per room"
            )
        if phase["log_warnings"]:
            lines.append(f"  server logs with warnings: {phase['log_warnings']}")
        if timelines:
            lines.append(render_timeline(phase))
    if report["ratios"]:
        r = report["ratios"]
        inverse = f" (baseline {1 / r['server_cpu_per_1k']:.1f}x ours)" if r["server_cpu_per_1k"] else ""
        lines.append(
            f"ours / baseline at {fmt(r['at_rate_per_room'], 'g')} msg/s per room"
            f"{'' if r['both_passed'] else ' (not passed by both)'}: "
            f"server CPU per 1k deliveries {fmt(r['server_cpu_per_1k'])}{inverse}, p99 {fmt(r['p99'])}"
            + (f"; max rate {fmt(r['max_rate'])}" if find_max else "")
        )
    if report["aborted"]:
        lines.append(f"ABORTED: {report['aborted']}")
    return "\n".join(lines)


def write(report: dict, json_path: str | None, say: Callable[[str], None]) -> None:
    """Write the JSON report to `json_path`, or to stdout when it is "-"."""
    if json_path and json_path != "-":
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        say(f"JSON report: {json_path}")
    elif json_path == "-":
        say(json.dumps(report))
