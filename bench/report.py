"""Markdown tables and (optional) PNG plots from benchmark rows."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.delay import Calibration
from bench.latency import P1Row, P4Row, percentile

if TYPE_CHECKING:
    from bench.postfix_load import P5Row

PATH_ORDER = ("postfix-direct", "haproxy-postfix", "proxy-postfix", "exim-native")

__all__ = ["calibration_table", "p1_plots", "p1_tables", "p4_table", "p5_table"]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "—"


def calibration_table(cals: Sequence[Calibration]) -> list[str]:
    if not cals:
        return []
    out = [
        "## Delay relay accuracy",
        "",
        "Median over 10 connections / 100 echoes; *added* = through the relay minus direct.",
        "",
        "| RTT setting ms | echo added ms | error | connect→banner added ms | error |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cals:
        out.append(
            f"| {c.rtt * 1000:g} | {c.echo_added * 1000:.3f} | {c.echo_error * 100:+.2f} % "
            f"| {c.banner_added * 1000:.3f} | {c.banner_error * 100:+.2f} % |"
        )
    return [*out, ""]


def _medians(rows: Sequence[P1Row]) -> dict[tuple[float, str, str], float]:
    groups: dict[tuple[float, str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r.rtt_ms, r.client, r.path), []).append(r.seconds * 1000)
    return {k: statistics.median(v) for k, v in groups.items()}


def p1_tables(rows: Sequence[P1Row]) -> list[str]:
    if not rows:
        return []
    med = _medians(rows)
    rtts = sorted({r.rtt_ms for r in rows})
    clients = [c for c in ("own", "exim") if any(r.client == c for r in rows)]
    paths = [p for p in PATH_ORDER if any(r.path == p for r in rows)]
    n = min(sum(1 for r in rows if (r.rtt_ms, r.client, r.path) == k) for k in med)
    out = [
        "## P1 — latency vs RTT",
        "",
        f"Median ms from the client's connect() to the final 250 after the message "
        f"(timed by the delay relay), n = {n} per cell; in brackets the same in RTTs; "
        "`early` = sessions that used early pipelining. Add one RTT for the SYN/SYN-ACK to "
        "compare with figures counted from the SYN.",
        "",
    ]
    for client in clients:
        name = "project client (proxy.client)" if client == "own" else "Exim 4.96 client"
        out += [
            f"### {name}",
            "",
            "| RTT ms | " + " | ".join(paths) + " | proxy/native Exim | proxy/HAProxy |",
            "| ---: | " + " | ".join("---:" for _ in paths) + " | ---: | ---: |",
        ]
        for rtt in rtts:
            cells = []
            for p in paths:
                m = med.get((rtt, client, p))
                mine = [r for r in rows if (r.rtt_ms, r.client, r.path) == (rtt, client, p)]
                early = sum(r.early for r in mine)
                in_rtt = f" ({m / rtt:.2f})" if m is not None and rtt else ""
                cells.append(f"{m:.2f}{in_rtt} early {early}/{len(mine)}" if m else "—")
            proxy = med.get((rtt, client, "proxy-postfix"))
            ratios = [
                _ratio(proxy, med.get((rtt, client, "exim-native"))),
                _ratio(proxy, med.get((rtt, client, "haproxy-postfix"))),
            ]
            out.append(f"| {rtt:g} | " + " | ".join(cells + ratios) + " |")
        out.append("")
    return out


def p1_plots(rows: Sequence[P1Row], out: Path) -> list[Path]:
    """delivery time vs RTT, one line per path, one PNG per client (if matplotlib exists)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed, no plots (pip install matplotlib)")
        return []
    med = _medians(rows)
    made = []
    for client in sorted({r.client for r in rows}):
        rtts = sorted({r.rtt_ms for r in rows if r.client == client})
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in PATH_ORDER:
            ys = [med.get((rtt, client, p)) for rtt in rtts]
            if all(y is not None for y in ys):
                ax.plot(rtts, ys, marker="o", label=p)
        ax.set_xlabel("RTT (ms)")
        ax.set_ylabel("connect → final 250, median (ms)")
        title = "project client" if client == "own" else "Exim 4.96 client"
        ax.set_title(f"P1: delivery time vs RTT ({title})")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out / f"p1_{client}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made


def p4_table(rows: Sequence[P4Row]) -> list[str]:
    if not rows:
        return []
    names = list(dict.fromkeys(r.path for r in rows))
    base = [r.seconds * 1000 for r in rows if r.path == "postfix-direct"]
    b50, b99 = percentile(base, 50), percentile(base, 99)
    out = [
        "## P4 — overhead at RTT 0",
        "",
        "One whole session each (connect → reply to QUIT, project client, 1 KiB message), "
        f"n = {len(base)} per path; *added* = path minus Postfix direct.",
        "",
        "| path | early | turns | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        mine = [r for r in rows if r.path == name]
        ms = [r.seconds * 1000 for r in mine]
        p50, p99 = percentile(ms, 50), percentile(ms, 99)
        out.append(
            f"| {name} | {sum(r.early for r in mine)}/{len(mine)} "
            f"| {statistics.median(r.turns for r in mine):g} | {p50:.3f} | {p99:.3f} "
            f"| {p50 - b50:+.3f} | {p99 - b99:+.3f} |"
        )
    return [*out, ""]


P5_TARGET = 0.80  # issue 12: the proxy's msgs/s at least this share of direct's


def p5_table(rows: Sequence[P5Row], medians: Sequence[dict[str, Any]]) -> list[str]:
    """P5 (bench/postfix_load.py): one line per path from `p5_medians`."""
    if not medians:
        return []
    rounds = max(r.round for r in rows) + 1 if rows else 0
    first = rows[0] if rows else None
    load = (
        f"`smtp-source -s {first.sessions} -m {first.messages} -l {first.message_bytes}`"
        if first
        else "smtp-source"
    )
    out = [
        "## P5 — throughput into a real Postfix",
        "",
        f"{load} toward each path, {rounds} round(s), every round running every path "
        "(order rotated each round; Postfix's queue empty before each run). One Postfix 3.7 "
        "(`virtual_transport = discard:`, `smtpd_forbid_unauth_pipelining = yes`) with a plain "
        "smtpd for `direct` and one with `smtpd_upstream_proxy_protocol = haproxy` for the "
        "relays: HAProxy `send-proxy-v2` (2 threads), `trio-floor` (bench/floors.py, PROXY v2 "
        "header, no SMTP), the proxy (`proxy-v2`; one process, `proxy-2w` "
        "`server.workers = 2`). Medians over the rounds; *vs direct* = median over direct's "
        "median, *per round* = range of the rounds' own ratios; CPU from /proc, per 1000 "
        "messages (relay: all threads and workers; Postfix: every process, delivery included). "
        "Client, relay and Postfix share the CPUs.",
        "",
        "| path | msgs/s | vs direct | per round | relay CPU s / 1000 msgs "
        "| Postfix CPU s / 1000 msgs | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in medians:
        vs = f"{m['vs_direct']:.2f}x" if m["vs_direct"] is not None else "—"
        lo, hi = m["round_ratio_min"], m["round_ratio_max"]
        direct = m["path"] == "direct"
        spread = lo is not None and m["rounds"] > 1 and not direct
        per_round = f"{lo:.2f}-{hi:.2f}x" if spread else "—"
        relay = "—" if direct else f"{m['relay_cpu_s_per_1000']:.2f}"
        out.append(
            f"| {m['path']} | {m['msgs_per_s']:.1f} | {vs} | {per_round} | {relay} "
            f"| {m['postfix_cpu_s_per_1000']:.2f} | {m['errors']} |"
        )
    proxy = next((m for m in medians if m["path"] == "proxy"), None)
    if proxy is not None and proxy["vs_direct"] is not None:
        met = "met" if proxy["vs_direct"] >= P5_TARGET else "missed"
        out += [
            "",
            f"Target (issue 12): proxy ≥ {P5_TARGET:.2f}x direct — measured "
            f"{proxy['vs_direct']:.2f}x ({met}).",
        ]
    return [*out, ""]
