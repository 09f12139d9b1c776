"""Markdown tables and (optional) PNG plots from benchmark rows."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.delay import Calibration
from bench.latency import P1Row, P4Row, percentile

if TYPE_CHECKING:
    from bench.outbound import P6Row
    from bench.postfix_load import P5Row

PATH_ORDER = ("postfix-direct", "haproxy-postfix", "proxy-postfix", "exim-native")

__all__ = [
    "calibration_table",
    "p1_plots",
    "p1_tables",
    "p4_table",
    "p5_table",
    "p6_plot",
    "p6_table",
]


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


# --------------------------------------------------------------------------- P6 (issue 13)

P6_TARGETS = {"cleartext": 0.65, "starttls": 0.80}  # issue 13: proxy/direct at RTT 50 ms
P6_ROUND_TRIPS = {  # from the SYN to the final reply: direct, early, early with TFO (issue 13)
    "cleartext": (5, 3, 2),
    "starttls": (8, 6, 5),
}


def _p6_cells(rows: Sequence[P6Row]) -> list[tuple[float, str]]:
    return sorted({(r.rtt_ms, r.tls) for r in rows}, key=lambda c: (c[1] != "cleartext", c))


def _p6_group(rows: Sequence[P6Row], rtt: float, tls: str, path: str) -> list[P6Row]:
    return [r for r in rows if (r.rtt_ms, r.tls, r.path) == (rtt, tls, path)]


def p6_table(
    rows: Sequence[P6Row], warmup: Sequence[P6Row], tfo: dict[str, int] | None = None
) -> list[str]:
    """P6 (bench/outbound.py): medians per path, ratios, L* and TFO counts, targets."""
    from bench.outbound import PATHS, median_ms, p6_lines

    if not rows:
        return []
    n = min(len(_p6_group(rows, r.rtt_ms, r.tls, r.path)) for r in rows)
    paths = [p for p in PATHS if any(r.path == p for r in rows)]
    out = [
        "## P6 — outbound mode: a real Postfix through the proxy to native Exim",
        "",
        "Postfix 3.7 → (iptables REDIRECT → `python -m proxy serve`, outbound mode, cache warm) "
        "→ delay relay → Exim 4.96 (`pipelining_connect_advertise_hosts = *`), all in one "
        "network namespace (bench/outbound.py). Median ms from the SYN (the relay's accept; it "
        "emulates the TCP handshake too, `--handshake`) to the MX's reply to the end of data "
        "reaching Postfix or the proxy, timed by the relay; in brackets the same in RTTs. "
        f"n = {n} per cell, paths taking turns message by message, one connection per message. "
        "`direct-noquit`: direct, but Postfix keeps the connection (its connection cache) "
        "instead of pipelining QUIT behind the dot, which Exim answers about 200 ms late "
        "(cleartext only).",
        "",
        "| RTT ms | TLS | " + " | ".join(paths) + " |",
        "| ---: | --- | " + " | ".join("---:" for _ in paths) + " |",
    ]
    for rtt, tls in _p6_cells(rows):
        cells = []
        for p in paths:
            mine = _p6_group(rows, rtt, tls, p)
            m = median_ms(mine) if mine else None
            cells.append(f"{m:.1f} ({m / rtt:.2f})" if m is not None else "—")
        out.append(f"| {rtt:g} | {tls} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Ratios of those medians; *Postfix c+d*: the same ratio from Postfix's own `delays=` "
        "(connection setup + transmission, two significant digits each); *L\\**: sessions "
        "Exim logged as early pipelining; *TFO*: proxy-tfo sessions whose SYN carried data "
        "(the relay's TCP_INFO); *MX dot*: ms from the end of data reaching Exim to its reply "
        "(relay, cleartext), direct / direct-noquit / proxy.",
        "",
        "| RTT ms | TLS | proxy/direct | proxy/direct-noquit | proxy-tfo/direct "
        "| proxy-tfo/proxy | Postfix c+d proxy/direct | L\\* proxy | L\\* proxy-tfo | TFO "
        "| MX dot ms |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rtt, tls in _p6_cells(rows):
        g = {p: _p6_group(rows, rtt, tls, p) for p in PATHS}
        med = {p: median_ms(v) if v else None for p, v in g.items()}
        pf = {p: median_ms(v, "postfix_seconds") if v else None for p, v in g.items()}

        def early(p: str, g: dict[str, list[P6Row]] = g) -> str:
            return f"{sum(r.exim_flag.startswith('L*') for r in g[p])}/{len(g[p])}" if g[p] else "—"

        tfo_used = (
            f"{sum(r.syn_data for r in g['proxy-tfo'])}/{len(g['proxy-tfo'])}"
            if g["proxy-tfo"]
            else "—"
        )
        dots = " / ".join(
            f"{median_ms(g[p], 'mx_dot_seconds'):.1f}" if g[p] else "—"
            for p in ("direct", "direct-noquit", "proxy")
        )
        out.append(
            f"| {rtt:g} | {tls} | {_ratio(med['proxy'], med['direct'])} "
            f"| {_ratio(med['proxy'], med['direct-noquit'])} "
            f"| {_ratio(med['proxy-tfo'], med['direct'])} "
            f"| {_ratio(med['proxy-tfo'], med['proxy'])} "
            f"| {_ratio(pf['proxy'], pf['direct'])} | {early('proxy')} | {early('proxy-tfo')} "
            f"| {tfo_used} | {dots if tls == 'cleartext' else '—'} |"
        )
    out += ["", "Expected (issue 13, round trips from the SYN; a ratio of medians):", ""]
    out += ["| TLS | direct | early | early + TFO | target at 50 ms | measured at 50 ms |"]
    out += ["| --- | ---: | ---: | ---: | --- | --- |"]
    for tls, (d, e, f) in P6_ROUND_TRIPS.items():
        at50 = {p: _p6_group(rows, 50.0, tls, p) for p in PATHS}
        if not at50["direct"] or not at50["proxy"]:
            measured = "not measured"
        else:
            ratio = median_ms(at50["proxy"]) / median_ms(at50["direct"])
            met = "met" if ratio <= P6_TARGETS[tls] else "**missed**"
            measured = f"proxy/direct {ratio:.3f} ({met})"
            if at50["direct-noquit"]:
                rt = median_ms(at50["proxy"]) / median_ms(at50["direct-noquit"])
                measured += f"; /direct-noquit {rt:.3f}"
            if at50["proxy-tfo"]:
                rt = median_ms(at50["proxy-tfo"]) / median_ms(at50["proxy"])
                measured += f"; proxy-tfo/proxy {rt:.3f} (expected {f / e:.2f})"
        out.append(
            f"| {tls} | {d} | {e} ({e / d:.2f}x) | {f} ({f / d:.2f}x) "
            f"| ≤ {P6_TARGETS[tls]:.2f}x | {measured} |"
        )
    out += ["", "```", *p6_lines(rows), "```"]
    misses = [r for r in warmup if r.path.startswith("proxy")]
    through = [r for r in rows if r.path.startswith("proxy")]
    tfo_rows = [r for r in rows if r.path == "proxy-tfo"]
    out += [
        "",
        "Checks:",
        "",
        "- Warm-up (unmeasured; one message per cell and RTT, two per proxy cell at the first "
        "RTT: the first through each proxy is its cache miss, the second fetches the TFO "
        "cookie): Exim logged "
        + (", ".join(f"{r.path}/{r.tls}@{r.rtt_ms:g}ms {r.exim_flag}" for r in misses) or "—")
        + ".",
        f"- Measured sessions through a proxy that Exim did not log as `L*`: "
        f"{sum(not r.exim_flag.startswith('L*') for r in through)} of {len(through)}"
        + "".join(
            f"; {r.path}/{r.tls}@{r.rtt_ms:g}ms message {r.message}: {r.exim_flag}"
            for r in through
            if not r.exim_flag.startswith("L*")
        )
        + ".",
        f"- proxy-tfo sessions whose SYN to the relay carried data: "
        f"{sum(r.syn_data for r in tfo_rows)} of {len(tfo_rows)} (bytes in it: "
        f"{', '.join(sorted({str(r.syn_bytes) for r in tfo_rows if r.syn_data})) or '—'}; "
        f"first line assumed, more having come before the relay accepted: "
        f"{sum(r.syn_guessed for r in tfo_rows)}); sessions through a proxy whose early bytes "
        f"reached Exim in the relay's own SYN: {sum(r.mx_syn_data for r in through)} of "
        f"{len(through)}.",
    ]
    if tfo:
        out += [
            "- TCP Fast Open in the namespace over the run (TcpExt, /proc/net/netstat; the "
            "proxy-tfo proxy's and the relays' own SYNs together): "
            + ", ".join(f"{k} {v}" for k, v in tfo.items())
            + ".",
        ]
    return [*out, ""]


def _p1_ratios(path: Path) -> dict[str, list[tuple[float, float]]]:
    """From a P1 CSV: proxy-postfix/postfix-direct per client, (RTT, ratio) for RTT > 0."""
    if not path.exists():
        return {}
    with path.open() as f:
        got = list(csv.DictReader(f))
    groups: dict[tuple[float, str, str], list[float]] = {}
    for r in got:
        key = (float(r["rtt_ms"]), r["client"], r["path"])
        groups.setdefault(key, []).append(float(r["seconds"]))
    med = {k: statistics.median(v) for k, v in groups.items()}
    out: dict[str, list[tuple[float, float]]] = {}
    for (rtt, client, p), m in sorted(med.items()):
        base = med.get((rtt, client, "postfix-direct"))
        if p == "proxy-postfix" and rtt > 0 and base:
            out.setdefault(client, []).append((rtt, m / base))
    return out


def p6_plot(rows: Sequence[P6Row], out: Path) -> list[Path]:
    """p6.png: P6's ratios against RTT, beside P1's (proxy-postfix/postfix-direct, from
    out/p1.csv) when that file is there (if matplotlib exists)."""
    from bench.outbound import median_ms

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed, no plots (pip install matplotlib)")
        return []
    if not rows:
        return []
    p1 = _p1_ratios(out / "p1.csv")
    fig, axes = plt.subplots(1, 2 if p1 else 1, figsize=(11 if p1 else 6, 4), squeeze=False)
    if p1:
        ax = axes[0][0]
        for client, points in p1.items():
            name = "project client" if client == "own" else "Exim 4.96 client"
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{name}")
        ax.set_title("P1 inbound: proxy→Postfix / Postfix direct\n(from connect())")
        ax.set_xlabel("RTT (ms)")
        ax.set_ylabel("ratio of medians")
        ax.set_ylim(0, 1.1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    top = 1.1
    for tls in ("cleartext", "starttls"):
        for path, base in (
            ("proxy", "direct"),
            ("proxy", "direct-noquit"),
            ("proxy-tfo", "direct"),
        ):
            points = []
            for rtt in sorted({r.rtt_ms for r in rows if r.tls == tls}):
                a = _p6_group(rows, rtt, tls, path)
                b = _p6_group(rows, rtt, tls, base)
                if a and b:
                    points.append((rtt, median_ms(a) / median_ms(b)))
            if points:
                top = max(top, max(y for _, y in points) + 0.1)
                style = "-" if tls == "cleartext" else "--"
                ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{tls} {path}/{base}")
        d, e, _ = P6_ROUND_TRIPS[tls]
        ax.axhline(e / d, color="grey", linestyle=":", linewidth=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_title("P6 outbound: Postfix→proxy→Exim / direct\n(from the SYN; dotted: 3/5, 6/8)")
    ax.set_xlabel("RTT (ms)")
    ax.set_ylabel("ratio of medians")
    ax.set_ylim(0, top)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    png = out / "p6.png"
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [png]
