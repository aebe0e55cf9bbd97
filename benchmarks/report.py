"""Render the suite's results: a console table and benchmarks/RESULTS.md."""

from __future__ import annotations

import math
import re
from typing import Any

CONTENDERS = ("floor", "engine", "peer")

TARGETS = {
    "ratio_floor": 0.7,
    "ratio_peer": 1.0,
    "p99_ms": 10.0,
    "rules_growth": 1.2,
    "rss_growth_mb": 50.0,
    "evals_per_s": 100_000,
    "trans_per_s": 20_000,
}


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _get(results: dict[str, Any], section: str, key: str) -> dict[str, Any]:
    r = results.get(section, {}).get(key)
    return r if isinstance(r, dict) else {"error": "not run"}


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str = "exec_per_s") -> float:
    if "error" in a or "error" in b:
        return math.nan
    x, y = a.get(key, math.nan), b.get(key, math.nan)
    return x / y if y else math.nan


def _status(ok: bool | None) -> str:
    if ok is None:
        return "**not measured**"
    return "met" if ok else "**not met**"


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for wf, label in (("kv", "3-transition KV workflow"), ("async", "publish_async round trip")):
        eng = _get(results, "nats", f"engine/{wf}/100")
        flo = _get(results, "nats", f"floor/{wf}/100")
        peer = _get(results, "nats", f"peer/{wf}/100")
        rf, rp = _ratio(eng, flo), _ratio(eng, peer)
        rows.append(
            (
                f"throughput at c=100, engine >= 0.7 x floor ({label})",
                f"{_f(rf)} x ({_f(eng.get('exec_per_s'))} vs {_f(flo.get('exec_per_s'))} executions/s)",
                _status(None if math.isnan(rf) else rf >= TARGETS["ratio_floor"]),
            )
        )
        rows.append(
            (
                f"throughput at c=100, engine >= 1.0 x peer ({label})",
                f"{_f(rp)} x ({_f(eng.get('exec_per_s'))} vs {_f(peer.get('exec_per_s'))} executions/s)",
                _status(None if math.isnan(rp) else rp >= TARGETS["ratio_peer"]),
            )
        )
    for wf, label in (("kv", "KV workflow"), ("async", "async workflow, KV-driven transitions")):
        eng = _get(results, "nats", f"engine/{wf}/1")
        p99 = eng.get("lat_p99_ms", math.nan)
        rows.append(
            (
                f"p99 KV change -> committed transition <= 10 ms at c=1 ({label})",
                f"{_f(p99)} ms (p50 {_f(eng.get('lat_p50_ms'))} ms)",
                _status(None if "error" in eng else p99 <= TARGETS["p99_ms"]),
            )
        )
    g_mem = _rules_growth(results, "memory")
    g_nats = _rules_growth(results, "nats")
    rows.append(
        (
            "per-event cost, 1 -> 1,000 non-matching rules, grows <= 1.2x (in memory, engine CPU per event, median of paired rounds)",
            f"{_f(g_mem)} x",
            _status(None if math.isnan(g_mem) else g_mem <= TARGETS["rules_growth"]),
        )
    )
    n1000 = _get(results, "noise", "1000/100")
    if math.isnan(g_nats) and "error" in n1000 and n1000["error"] != "not run":
        g100 = _rules_growth(results, "nats", upto=100)
        rows.append(
            (
                "per-event cost, 1 -> 1,000 non-matching rules, grows <= 1.2x (NATS, engine CPU per event at c=100)",
                "the engine does not start with 1,000 KV rules on one bucket (see Scaling); "
                f"1 -> 100 rules: {_f(g100)} x",
                "**not met**",
            )
        )
    else:
        rows.append(
            (
                "per-event cost, 1 -> 1,000 non-matching rules, grows <= 1.2x (NATS, engine CPU per event at c=100)",
                f"{_f(g_nats)} x",
                _status(None if math.isnan(g_nats) else g_nats <= TARGETS["rules_growth"]),
            )
        )
    rest = results.get("at_rest", {})
    lo, hi = rest.get("1000", {}), rest.get("100000", {})
    if "rss_after_mb" in lo and "rss_after_mb" in hi:
        growth = hi["rss_after_mb"] - lo["rss_after_mb"]
        rows.append(
            (
                "engine RSS grows <= 50 MB from 10^3 to 10^5 executions at rest",
                f"+{_f(growth)} MB ({_f(lo['rss_after_mb'])} -> {_f(hi['rss_after_mb'])} MB)",
                _status(growth <= TARGETS["rss_growth_mb"]),
            )
        )
    else:
        rows.append(
            ("engine RSS grows <= 50 MB from 10^3 to 10^5 executions at rest", "-", _status(None))
        )
    ev = _get(results, "memory", "evaluations/100")
    tr = _get(results, "memory", "transitions/100")
    rows.append(
        (
            "in memory: >= 100,000 condition evaluations/s",
            f"{_f(ev.get('evals_per_s'))} /s ({_spread(ev, 'evals_per_s')})",
            _status(None if "error" in ev else ev["evals_per_s"] >= TARGETS["evals_per_s"]),
        )
    )
    rows.append(
        (
            "in memory: >= 20,000 transitions/s",
            f"{_f(tr.get('trans_per_s'))} /s (c=100; {_spread(tr, 'trans_per_s')})",
            _status(None if "error" in tr else tr["trans_per_s"] >= TARGETS["trans_per_s"]),
        )
    )
    return rows


def _spread(r: dict[str, Any], key: str) -> str:
    """'best of N, median M' for an in-memory result, or '' for a single run."""
    runs = r.get(f"runs_{key}", [])
    if len(runs) < 2:
        return "one run"
    return f"best of {len(runs)}, median {_f(r.get(f'median_{key}'))}"


def _rules_growth(results: dict[str, Any], where: str, upto: int = 1000) -> float:
    if where == "memory":
        sc = _get(results, "memory", "scaling")
        if "error" in sc:
            return float("nan")
        return float(sc["per_count"][str(upto)]["median_ratio_to_first"])
    else:
        a = _get(results, "noise", "1/100")
        b = _get(results, "noise", f"{upto}/100")
    if "error" in a or "error" in b:
        return math.nan
    return b["cpu_us_per_event"] / a["cpu_us_per_event"]


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _nats_table(results: dict[str, Any], wf: str) -> list[str]:
    rt = wf == "async"
    head = (
        "| contender | c | executions/s | transitions/s | p50 ms | p99 ms | "
        + ("round trip p50 / p99 ms | " if rt else "")
        + "execution p50 / p99 ms | peak RSS MB | CPU µs/event | sys % | socket writes/exec | "
        "commands/write | loop iterations/exec | server CPU ms/exec | others busy % |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for conc in (1, 100):
        for c in CONTENDERS:
            r = _get(results, "nats", f"{c}/{wf}/{conc}")
            if "error" in r:
                lines.append(f"| {c} | {conc} | **failed**: {r['error'][:300]} |")
                continue
            execs = r["executions"]
            sys_pct = 100 * r.get("cpu_sys_s", 0) / r["cpu_s"] if r.get("cpu_s") else math.nan
            reps = r.get("runs_exec_per_s")
            xps = _f(r["exec_per_s"]) + (
                f" (runs: {', '.join(_f(x) for x in reps)})" if reps and len(reps) > 1 else ""
            )
            row = [
                c,
                str(conc),
                xps,
                _f(r["trans_per_s"]),
                _f(r["lat_p50_ms"]),
                _f(r["lat_p99_ms"]),
            ]
            if rt:
                row.append(f"{_f(r.get('rt_p50_ms'))} / {_f(r.get('rt_p99_ms'))}")
            row += [
                f"{_f(r['e2e_p50_ms'])} / {_f(r['e2e_p99_ms'])}",
                _f(r["maxrss_mb"]),
                _f(r["cpu_us_per_event"]),
                _f(sys_pct, 2),
                _f(r.get("writes_per_exec"), 2),
                _f(r.get("chunks_per_write"), 2),
                _f(r.get("loop_iterations_per_exec"), 3),
                _f(1000 * r.get("server_cpu_s", math.nan) / execs, 3),
                _f(r.get("others_busy_pct"), 2),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def _ratios_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| workflow | c | engine/floor executions/s | engine/peer executions/s | "
        "engine/floor CPU per event | engine/peer CPU per event | engine/floor p99 | engine/peer p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for wf in ("kv", "async"):
        for conc in (1, 100):
            e = _get(results, "nats", f"engine/{wf}/{conc}")
            fl = _get(results, "nats", f"floor/{wf}/{conc}")
            p = _get(results, "nats", f"peer/{wf}/{conc}")
            lines.append(
                f"| {wf} | {conc} | {_f(_ratio(e, fl))} | {_f(_ratio(e, p))} | "
                f"{_f(_ratio(e, fl, 'cpu_us_per_event'))} | {_f(_ratio(e, p, 'cpu_us_per_event'))} | "
                f"{_f(_ratio(e, fl, 'lat_p99_ms'))} | {_f(_ratio(e, p, 'lat_p99_ms'))} |"
            )
    return lines


def _memory_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| run | executions/s | transitions/s | condition evaluations/s | CPU µs per KV event | peak RSS MB | others busy % | all runs (the rate each was ranked by) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {
        "transitions/1": "Engine(MemoryBackend), 3-transition workflow, c=1",
        "transitions/100": "Engine(MemoryBackend), 3-transition workflow, c=100",
        "evaluations/100": "+ 100 always-false conditions per event, c=100",
        "testengine/1": "TestEngine.trigger_kv (settles after each), sequential",
    }
    for key, label in labels.items():
        r = _get(results, "memory", key)
        if "error" in r:
            lines.append(f"| {label} | **failed**: {r['error'][:300]} |")
            continue
        lines.append(
            f"| {label} | {_f(r.get('exec_per_s'))} | {_f(r.get('trans_per_s'))} | "
            f"{_f(r.get('evals_per_s'))} | {_f(r.get('cpu_us_per_event'))} | {_f(r.get('maxrss_mb'))} | "
            f"{_f(r.get('others_busy_pct'), 2)} | {_all_runs(r)} |"
        )
    return lines


def _all_runs(r: dict[str, Any]) -> str:
    for key in ("runs_trans_per_s", "runs_evals_per_s", "runs_exec_per_s"):
        if key in r:
            return ", ".join(_f(x) for x in r[key])
    return "-"


def _noise_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| non-matching rules | in memory: CPU µs/event, lowest / median of the paired rounds; median ratio to 1 rule | NATS c=100: executions/s | NATS c=100: engine CPU µs/event, lowest of the runs (all runs) | "
        "NATS c=1: p50 / p99 ms | NATS c=1: engine CPU µs/event | peak RSS MB (NATS c=100) |",
        "|---|---|---|---|---|---|---|",
    ]
    failures = []
    for noise in results.get("counts", {}).get("noise", [1, 10, 100, 1000]):
        sc = _get(results, "memory", "scaling")
        m = sc.get("per_count", {}).get(str(noise), {}) if "error" not in sc else {}
        n100 = _get(results, "noise", f"{noise}/100")
        n1 = _get(results, "noise", f"{noise}/1")
        for label, r in (("c=1", n1), ("c=100", n100)):
            if "error" in r and r["error"] != "not run":
                failures.append(f"- {noise} rules, NATS {label}: **failed** -- {_short_error(r)}")
        lines.append(
            f"| {noise} | {_f(m.get('lowest_us_per_event'))} / {_f(m.get('median_us_per_event'))}; "
            f"{_f(m.get('median_ratio_to_first'))} x | {_f(n100.get('exec_per_s'))} | "
            f"{_f(n100.get('cpu_us_per_event'))} ({', '.join(_f(x) for x in n100.get('runs_cpu_us_per_event', []))}) | "
            f"{_f(n1.get('lat_p50_ms'))} / {_f(n1.get('lat_p99_ms'))} | "
            f"{_f(n1.get('cpu_us_per_event'))} | {_f(n100.get('maxrss_mb'))} |"
        )
    if failures:
        lines += ["", *failures]
    return lines


def _short_error(r: dict[str, Any]) -> str:
    """The error, with the most telling line of the child's stderr (repeated warnings collapsed)."""
    err = r.get("error", "")
    head = err.split(";", 1)[0]
    tail = r.get("stderr") or err
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    telling = [ln for ln in lines if "failed" in ln or "Error" in ln or "error" in ln]
    seen: list[str] = []
    keys: set[str] = set()
    for ln in telling:
        ln = re.sub(r"^stderr tail: ", "", ln)
        key = re.sub(r"[0-9.]+", "#", ln)  # "retrying in 0.1s" and "in 0.2s" are one line
        if key not in keys:
            keys.add(key)
            seen.append(re.sub(r"; retrying in [0-9.]+s$", "; retrying", ln))
    detail = "; ".join(f"`{ln[:300]}`" for ln in seen[:3])
    return f"{head}. {detail}" if detail else head


def _rest_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| executions at rest | RSS before engine start MB | RSS after replay MB | "
        "RSS after malloc_trim MB | peak RSS MB | replay s | timers held | "
        "Python small blocks held (before -> after) | pymalloc 1 MiB arenas after | "
        "replay peak: entries (MB) waiting in "
        "nats-py's subscription queue / items queued for workers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in results.get("at_rest", {}).items():
        if "error" in r:
            lines.append(f"| {int(n):,} | **failed**: {r['error'][:300]} |")
            continue
        lines.append(
            f"| {int(n):,} | {_f(r['rss_before_mb'])} | {_f(r['rss_after_mb'])} | "
            f"{_f(r.get('rss_after_trim_mb'))} | {_f(r['maxrss_mb'])} | "
            f"{_f(r['replay_s'])} | {_f(r.get('timers'))} | "
            f"{_f(r.get('allocated_blocks_before'))} -> {_f(r.get('allocated_blocks'))} | "
            f"{_f(r.get('pymalloc_arenas'))} | "
            + (
                f"{_f(pk.get('pending_msgs'))} ({_f(pk.get('pending_bytes', 0) / 1e6)}) / "
                f"{_f(pk.get('worker_queued'))} |"
                if (pk := r.get("replay_peaks"))
                else "- |"
            )
        )
    return lines


def _groups_table(prof: dict[str, Any]) -> list[str]:
    if not prof.get("groups"):
        return []
    lines = ["Where the samples are, by the module of the innermost Python frame:", ""]
    lines += ["| share % | module group |", "|---|---|"]
    for g, share in prof["groups"]:
        lines.append(f"| {100 * share:.1f} | {g} |")
    lines.append("")
    return lines


def _memory_profile_section(results: dict[str, Any]) -> list[str]:
    r = results.get("profile_memory")
    if not r or "error" in r or not r.get("profile"):
        return []
    prof = r["profile"]
    lines = [
        "",
        "### In memory",
        "",
        f"`Engine(MemoryBackend())`, 3-transition workflow, c=100, under py-spy `--gil` "
        f"({prof.get('samples')} samples, start-up imports left out; "
        f"{_f(r.get('trans_per_s'))} transitions/s under the profiler).",
        "",
        *_groups_table(prof),
        "| self % | function |",
        "|---|---|",
    ]
    for name, share in prof["self"][:15]:
        lines.append(f"| {100 * share:.1f} | `{name}` |")
    lines += ["", "| inclusive % | function |", "|---|---|"]
    shown = 0
    for name, share in prof["inclusive"]:
        if any(k in name for k in ("reactive/", "prometheus", "anyio/", "codecs.py")):
            lines.append(f"| {100 * share:.1f} | `{name}` |")
            shown += 1
            if shown >= 25:
                break
    return lines


def _profile_section(results: dict[str, Any]) -> list[str]:
    r = results.get("profile")
    if not r:
        return ["(profile run skipped)"]
    if "error" in r:
        return [f"The profiled run failed: {r['error'][:500]}"]
    prof = r.get("profile")
    if not prof:
        return [f"No profile was recorded: {r.get('profile_error', '?')}"]
    tool = prof.get("tool")
    lines = [
        f"Engine, 3-transition KV workflow, c=100, {r['executions']} executions under {tool} "
        f"({prof.get('samples')} samples; throughput under the profiler {_f(r['exec_per_s'])} executions/s). "
        + (
            "py-spy samples with `--gil`: only stacks holding the GIL, i.e. Python CPU time; "
            "time inside system calls (socket send/recv, epoll) is not in these shares -- it was "
            f"{_f(100 * r['cpu_sys_s'] / r['cpu_s'], 2)} % of the engine's CPU time in this run (getrusage)."
            if tool == "py-spy"
            else "pyinstrument samples wall time of the main thread (async_mode disabled)."
        ),
        "",
        *_groups_table(prof),
        "Top functions by self time (share of samples):",
        "",
        "| self % | function |",
        "|---|---|",
    ]
    for name, share in prof["self"][:20]:
        lines.append(f"| {100 * share:.1f} | `{name}` |")
    lines += [
        "",
        "Inclusive time of the engine's own functions and of the library calls on its path:",
        "",
        "| inclusive % | function |",
        "|---|---|",
    ]
    shown = 0
    for name, share in prof["inclusive"]:
        if any(
            k in name
            for k in (
                "reactive/",
                "nats/js/kv.py",
                "prometheus",
                "anyio/streams/memory",
                "asyncio/tasks.py",
                "msgspec",
                "codecs.py",
                "_flusher",
                "_read_loop",
            )
        ):
            lines.append(f"| {100 * share:.1f} | `{name}` |")
            shown += 1
            if shown >= 40:
                break
    return lines


def _observations(results: dict[str, Any]) -> list[str]:
    """What the numbers of this run say, computed from them (the README explains the columns)."""
    out: list[str] = []
    e = _get(results, "nats", "engine/kv/100")
    f = _get(results, "nats", "floor/kv/100")
    if "error" not in e and "error" not in f:
        out.append(
            f"- **Batching.** At c=100 the floor sends {_f(f.get('chunks_per_write'))} protocol commands "
            f"per socket write and runs {_f(f.get('loop_iterations_per_exec'), 2)} event-loop iterations "
            f"per execution; the engine {_f(e.get('chunks_per_write'))} and "
            f"{_f(e.get('loop_iterations_per_exec'), 3)}. The fewer commands per write, the more "
            "system calls, each of which also wakes nats-server: the server spends "
            f"{_f(1000 * e.get('server_cpu_s', math.nan) / e['executions'], 3)} ms of CPU per engine "
            f"execution against {_f(1000 * f.get('server_cpu_s', math.nan) / f['executions'], 3)} ms "
            "per floor execution."
        )
        out.append(
            f"- **CPU per event.** Engine {_f(e.get('cpu_us_per_event'))} µs vs floor "
            f"{_f(f.get('cpu_us_per_event'))} µs at c=100: at equal CPU the engine would reach "
            f"{_f(f.get('cpu_us_per_event', math.nan) / e.get('cpu_us_per_event', math.nan))} x the "
            "floor's throughput"
            + (
                "; the throughput target (0.7 x) needs the engine's own cost per event roughly "
                f"divided by {_f(need)}."
                if (
                    need := 0.7
                    * e.get("cpu_us_per_event", math.nan)
                    / f.get("cpu_us_per_event", math.nan)
                )
                > 1
                else " (the target is 0.7 x)."
            )
        )
    for key, r in results.get("nats", {}).items():
        c, wf, conc = key.split("/")
        if conc != "1" or not isinstance(r, dict) or "error" in r:
            continue
        mean_ms = 1000 / r["exec_per_s"] if r.get("exec_per_s") else math.nan
        if mean_ms > 1.5 * r.get("e2e_p99_ms", math.inf):
            out.append(
                f"- **Outlier.** {c}, {wf} workflow, c=1: the mean time per execution "
                f"({_f(mean_ms)} ms) is above its p99 ({_f(r['e2e_p99_ms'])} ms); the slowest "
                f"execution took {_f(r.get('e2e_max_ms'))} ms, so that row's executions/s rests on "
                "one or two stalls rather than on the typical execution; compare it on its p50 / p99."
            )
    rest = results.get("at_rest", {})
    hi = rest.get("100000", {})
    if "rss_after_mb" in hi and hi.get("rss_after_trim_mb"):
        out.append(
            f"- **Memory at rest.** After replaying 100,000 executions the engine holds "
            f"{_f(hi['rss_after_mb'])} MB RSS ({_f(hi.get('rss_after_trim_mb'))} MB after "
            f"`malloc_trim(0)`), {_f(hi.get('timers'))} timers (an execution's deadlines are schedules "
            "in NATS, not timers in the engine) and "
            f"{_f((hi.get('allocated_blocks') or 0) - (hi.get('allocated_blocks_before') or 0))} "
            "more small Python blocks than before it started; what remains of the growth is "
            f"pymalloc arenas ({_f(hi.get('pymalloc_arenas'))} of 1 MiB) kept by the few live "
            "blocks scattered over the heap the replay used. "
            + (
                f"While it took the bucket in, up to {_f(pk.get('pending_msgs'))} messages "
                f"({_f(pk.get('pending_bytes', 0) / 1e6)} MB) waited in nats-py's subscription "
                f"queues while at most {_f(pk.get('worker_queued'))} items were queued for the "
                "workers (`queue_limit`); the partitions' pulls ask for at most a batch per "
                "partition at a time."
                if (pk := hi.get("replay_peaks"))
                else ""
            )
        )
    n1000 = _get(results, "noise", "1000/100")
    if "error" in n1000 and n1000["error"] != "not run":
        out.append(
            "- **1,000 KV rules do not start on NATS.** `Engine._start_triggers` calls "
            "`_restart_watch(bucket)` once per KV rule; each call cancels the previous watch task "
            "after its consumer-create request is already out, so a workflow with N KV rules leaves "
            "about N ordered consumers on the bucket's stream (nats-py's watch sets a 5-minute "
            "inactivity threshold). nats-server refuses the 1,001st consumer "
            "(`maximum consumers limit reached`, err 10026) and the engine retries the watch forever "
            "without becoming ready."
        )
    mem = _get(results, "memory", "transitions/100")
    if "error" not in mem:
        out.append(
            f"- **In memory** one KV event costs {_f(mem.get('cpu_us_per_event'))} µs of CPU; "
            "20,000 transitions/s is 26,700 KV events/s (4 events per 3 transitions), i.e. at most "
            "~37 µs per event on one core. The in-memory profile below shows where it goes."
        )
    return out


def render(results: dict[str, Any], *, command: str, env: dict[str, Any]) -> str:
    others = [
        r.get("others_busy_pct", math.nan)
        for r in list(results.get("nats", {}).values()) + list(results.get("noise", {}).values())
        if isinstance(r, dict) and "error" not in r
    ]
    others = [x for x in others if not math.isnan(x)]
    out = [
        "# Benchmark results",
        "",
        f"Produced by `{command}` on {env['date']}, in {_f(results.get('elapsed_s', math.nan))} s.",
        "",
        f"- Machine: {env['cores']} cores ({env['cpu_model'] or 'unknown CPU'}), "
        f"{env['mem_gib']:.1f} GiB memory; {env['platform']}",
        f"- Python {env['python']}, nats-py {env['nats_py']}, {env['nats_server']}, "
        f"FastStream {env['faststream']} (pydantic {env.get('pydantic')}), msgspec {env['msgspec']}, "
        f"anyio {env.get('anyio')}, py-spy {env.get('py_spy')}",
        f"- Engine code: commit `{env.get('commit', '?')}`"
        + (
            f" plus uncommitted changes (other engineers' work in progress) in: {', '.join(env['dirty'])}"
            if env.get("dirty")
            else " (clean)"
        ),
        "- One embedded nats-server (JetStream, file storage, loopback) for the whole run; "
        "every contender runs in its own process, the load generator and observer in the parent.",
    ]
    if others:
        out.append(
            f"- The machine is shared: other users' processes took {min(others):.0f}-{max(others):.0f} % "
            f"(median {sorted(others)[len(others) // 2]:.0f} %) of its CPU during the measured windows "
            "(column *others busy %*). Wall-clock numbers move with that; the CPU-per-event, "
            "writes-per-execution and loop-iteration columns do not much."
        )
    out += [
        "",
        "See `benchmarks/README.md` for what each number measures.",
        "",
        "## Targets",
        "",
        "| target | measured | status |",
        "|---|---|---|",
    ]
    for t, v, s in targets(results):
        out.append(f"| {t} | {v} | {s} |")
    out += [
        "",
        "## Observations from this run",
        "",
        *_observations(results),
        "",
        "## 1-3. Floor, engine and peer on NATS",
        "",
        "c = executions in flight. p50 / p99 = KV change -> committed transition, as seen by an "
        "independent watcher (the async workflow's callback transitions are in the round-trip column). "
        "execution = first state written -> completion event received.",
        "",
        "### 3-transition KV workflow",
        "",
        *_nats_table(results, "kv"),
        "",
        "### publish_async round trip (simulated worker)",
        "",
        *_nats_table(results, "async"),
        "",
        "### Ratios (same run)",
        "",
        *_ratios_table(results),
        "",
        "## 4. In memory (what property-based tests pay)",
        "",
        *_memory_table(results),
        "",
        "## 5. Scaling",
        "",
        "### Non-matching rules",
        "",
        *_noise_table(results),
        "",
        "### Executions at rest (engine memory)",
        "",
        "Half completed (with their delivered outbox and its marker), half waiting on a task due "
        "in an hour, as the engine leaves them, written before any engine partitioned the "
        "bucket; the engine starts, takes every key in through its partitions (as the first "
        "engine on a bucket does), and RSS is read (after `gc.collect()`) once that has been "
        "processed.",
        "",
        *_rest_table(results),
        "",
        "## Profile",
        "",
        "### On NATS",
        "",
        *_profile_section(results),
        *_memory_profile_section(results),
        "",
    ]
    return "\n".join(out)


def console(results: dict[str, Any]) -> str:
    out = []
    for wf in ("kv", "async"):
        out.append(f"== {wf} workflow")
        out.append(
            f"{'contender':<8} {'c':>4} {'exec/s':>9} {'trans/s':>9} {'p50ms':>8} {'p99ms':>8} "
            f"{'RSS MB':>7} {'CPUus/ev':>9} {'others%':>8}"
        )
        for conc in (1, 100):
            for c in CONTENDERS:
                r = _get(results, "nats", f"{c}/{wf}/{conc}")
                if "error" in r:
                    out.append(f"{c:<8} {conc:>4} ERROR {r['error'][:200]}")
                    continue
                out.append(
                    f"{c:<8} {conc:>4} {r['exec_per_s']:>9.1f} {r['trans_per_s']:>9.1f} "
                    f"{r['lat_p50_ms']:>8.2f} {r['lat_p99_ms']:>8.2f} {r['maxrss_mb']:>7.1f} "
                    f"{r['cpu_us_per_event']:>9.0f} {r.get('others_busy_pct', math.nan):>8.0f}"
                )
    out.append("== ratios (executions/s)")
    for wf in ("kv", "async"):
        for conc in (1, 100):
            e = _get(results, "nats", f"engine/{wf}/{conc}")
            fl = _get(results, "nats", f"floor/{wf}/{conc}")
            p = _get(results, "nats", f"peer/{wf}/{conc}")
            out.append(
                f"{wf:<6} c={conc:<4} engine/floor={_f(_ratio(e, fl))}  engine/peer={_f(_ratio(e, p))}"
            )
    out.append("== targets")
    for t, v, s in targets(results):
        out.append(f"[{s.replace('*', '')}] {t}: {v}")
    return "\n".join(out)
