"""A real Prometheus (Debian's 2.42 binary) on loopback, scraping a proxy that just carried a
real Exim 4.96 client's three deliveries to a real Postfix, with the shipped
deploy/prometheus/rules.yml: every recorded series has the value the traffic implies, every
query of dashboards/pipeconnect.json returns data (after a little extra traffic for the
three that would otherwise have none), and when the proxy stops the shipped target-down alert
goes pending (its `for: 5m` outlasts the test) while a copy with `for: 3s` goes on to fire.

Scrapes and rule evaluations run every second, so the whole test takes well under a minute.
"""

from __future__ import annotations

import math
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # (no types-PyYAML in the venv)

from proxy.outcomes import ENDED, Outcome
from tests.certs import write_tls_files
from tests.conftest import ProxyFactory
from tests.integration.test_metrics_e2e import get, samples
from tests.mta import EximClient, Postfix, deliveries, free_port
from tests.prometheus import (
    Point,
    Prometheus,
    extrapolated_rate,
    points,
    poll,
    require_prometheus,
    value,
)
from tests.proxyproc import ProxyProcess
from tests.test_metrics_dashboard import RULES, dashboard_exprs, load_dashboard, substitute

JOB = "pipeconnect"  # the job name PipeconnectTargetDown expects (rules.yml, README)
DEADLINE = 40.0  # seconds for Prometheus to catch up with any one step
Labels = tuple[tuple[str, str], ...]  # a series' labels without __name__, job and instance


@dataclass(frozen=True)
class Recorded:
    """A recording rule `sum by (job, instance[, by]) (rate|increase(source[range]))`, and
    the final value of each `source` series that the traffic implies."""

    source: str
    range_s: float
    is_rate: bool
    final: dict[Labels, float]
    by: str | None = None
    # The counter was already scraped at 0 before the traffic (unlabelled counters and the
    # label values the proxy initialises), so Prometheus saw the whole increase.
    from_zero: bool = True


def key(metric: dict[str, str]) -> Labels:
    return tuple(
        sorted((k, v) for k, v in metric.items() if k not in ("__name__", "job", "instance"))
    )


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    made: list[Prometheus] = []

    def make(targets: dict[str, list[str]], rule_files: list[Path]) -> Prometheus:
        require_prometheus()
        prom = Prometheus(tmp_path / f"prometheus{len(made)}", free_port(), targets, rule_files)
        made.append(prom)
        return prom.start()

    yield make
    for prom in made:
        prom.stop(timeout=10)


def short_for_copy(path: Path, alert: str, for_: str) -> Path:
    """A rules file holding only a copy of the shipped `alert` (same expr, labels and
    annotations, read from rules.yml) with `for:` set to `for_` and a label `for_override`
    so that its ALERTS series differ from the shipped rule's."""
    shipped = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in shipped["groups"] for r in g["rules"] if r.get("alert") == alert]
    copy = {**rule, "for": for_, "labels": {**rule.get("labels", {}), "for_override": for_}}
    path.write_text(yaml.safe_dump({"groups": [{"name": "test.short-for", "rules": [copy]}]}))
    return path


def expected_rule_values(
    prom: Prometheus, source: str, sel: str, spec: Recorded, at: float
) -> tuple[dict[Labels, float], dict[str, list[float]]]:
    """(final raw values, {group: candidate values}) for the rule evaluated at `at`.

    A rule evaluated at `at` sees the samples with timestamps up to `at` -- except the latest
    scrape's when that scrape (stamped at its start) was still being appended: both sample
    sets are candidates."""
    raw = prom.query(f"{source}{{{sel}}}[{spec.range_s:g}s]", at=at)
    assert raw, f"{source}: no raw samples at {at}"
    series = {key(s["metric"]): points(s) for s in raw}
    latest = max(p[-1][0] for p in series.values())
    candidates: dict[str, list[float]] = {}
    for drop_latest in (False, True):
        groups: dict[str, float] = {}
        for labels, pts in series.items():
            use: list[Point] = [p for p in pts if not (drop_latest and p[0] == latest)]
            if len(use) < 2:
                continue  # rate() drops a series with fewer than two samples
            group = dict(labels).get(spec.by, "") if spec.by else ""
            rate = extrapolated_rate(use, at, spec.range_s, is_rate=spec.is_rate)
            groups[group] = groups.get(group, 0.0) + rate
        for group, v in groups.items():
            candidates.setdefault(group, []).append(v)
    return {labels: pts[-1][1] for labels, pts in series.items()}, candidates


def test_live_prometheus_rules_dashboard_and_alert(
    tmp_path: Path,
    postfix: Postfix,
    exim_client_factory: Callable[..., EximClient],
    proxy_factory: ProxyFactory,
    prometheus_factory: Callable[..., Prometheus],
) -> None:
    require_prometheus()
    tls_files = write_tls_files(tmp_path, "mx.test", "127.0.0.1")
    metrics_port, implicit_port = free_port(), free_port()
    proxy: ProxyProcess = proxy_factory(
        postfix.port,
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        # TLS only for the one tls_on_connect session of step 2; the Exim client keeps to
        # cleartext (hosts_avoid_tls), as in test_metrics_e2e.
        tls={"certificate": tls_files["certificate"], "key": tls_files["key"]},
        listen={"tls_on_connect": [f"127.0.0.1:{implicit_port}"]},
    )
    instance = f"127.0.0.1:{metrics_port}"
    sel = f'job="{JOB}",instance="{instance}"'

    # The shipped rules as they are, plus a copy of the target-down alert with `for: 3s`
    # (its `for: 5m` outlasts a test; the shipped rule is only seen going pending).
    short = short_for_copy(tmp_path / "target_down_for_3s.yml", "PipeconnectTargetDown", "3s")
    prom = prometheus_factory({JOB: [instance]}, [RULES, short])

    # ------------------------------------------------------------ 0: scraped before traffic
    poll(
        "a first scrape with the counters at 0",
        lambda: prom.query(f"pipeconnect_early_pipelining_advertised_total{{{sel}}} == 0") or None,
        DEADLINE,
    )

    # ------------------------------------------------------------ 1: three Exim deliveries
    exim = exim_client_factory(proxy.port)
    logs = [exim.send("alice@client.test", "box@dest.test", f"n{n}\n".encode()) for n in (1, 2, 3)]
    # the first learns the keyword (L.), the next two use it (L*)
    assert [deliveries(log)[-1].early_pipelined for log in logs] == [False, True, True], logs
    postfix.wait_messages(3)
    proxy.session_lines(3)
    status, text = get(metrics_port, "/metrics")
    assert status == 200
    scraped = samples(text)
    time_saved = scraped[("pipeconnect_time_saved_seconds_total", ())]
    assert time_saved > 0, text

    # What the traffic implies for each recorded series' source counters. The rule's value
    # is then exactly Prometheus's extrapolated rate()/increase() of those samples (checked
    # against tests.prometheus.extrapolated_rate on the very samples, no tolerance beyond
    # float rounding): from 0 to N within the window, extrapolated to the window's end by
    # at most 1.1 scrape intervals and, from 0, not at all to its start -- so e.g.
    # advertised:rate5m is 3/300 times a factor just above 1 that the timestamps decide.
    recorded: dict[str, Recorded] = {
        "pipeconnect:early_pipelining_advertised:rate5m": Recorded(
            "pipeconnect_early_pipelining_advertised_total", 300, True, {(): 3}
        ),
        "pipeconnect:early_pipelining_used:rate5m": Recorded(
            "pipeconnect_early_pipelining_used_total", 300, True, {(): 2}
        ),
        "pipeconnect:time_saved_seconds:increase1h": Recorded(
            # RTT-dependent: the traffic implies only what the proxy itself counted
            "pipeconnect_time_saved_seconds_total",
            3600,
            False,
            {(): time_saved},
        ),
        "pipeconnect:round_trips_saved:increase1h": Recorded(
            # deliveries 2 and 3 each skipped the wait for the banner and the EHLO reply
            "pipeconnect_round_trips_saved_total",
            3600,
            False,
            {(): 4},
        ),
        "pipeconnect:sync_errors:rate5m": Recorded(
            "pipeconnect_early_input_refused_total",
            300,
            True,
            {(("action", "defer"),): 0, (("action", "reject"),): 0},
        ),
        "pipeconnect:sessions:rate5m": Recorded(
            "pipeconnect_sessions_total",
            300,
            True,
            # every {listener, outcome} is exported as 0 from the start
            {
                (("listener", listener), ("outcome", str(outcome))): float(
                    (listener, outcome) == ("plain", Outcome.QUIT)
                )
                * 3
                for listener in ("plain", "tls_on_connect")
                for outcome in ENDED
            },
            by="outcome",
        ),
    }
    ratio = "pipeconnect:early_pipelining_use_ratio:rate5m"
    # outbound mode is off here: its ratio has no outbound session to divide by
    outbound_ratio = "pipeconnect:outbound_early_ratio:rate5m"
    shipped_records = {
        r["record"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    assert shipped_records == {*recorded, ratio, outbound_ratio}, (
        "a new recording rule needs an expectation"
    )

    seen: dict[str, Any] = {}

    def rules_have_traffic_values() -> bool:
        # 2 used / 3 advertised: a ratio of rates over the same window and the same
        # samples, so the extrapolation factor cancels and 2/3 is exact.
        result = prom.query(f"{ratio}{{{sel}}}")
        assert len(result) == 1 and math.isclose(value(result[0]), 2 / 3, rel_tol=1e-12), result
        seen[ratio] = value(result[0])
        for name, spec in recorded.items():
            # the rule's own latest sample, with the time it was evaluated at (an instant
            # query would stamp it with the query's time instead)
            result = prom.query(f"{name}{{{sel}}}[5s]")
            groups = {s["metric"].get(spec.by, "") if spec.by else "": s for s in result}
            assert len(groups) == len(result) and result, f"{name}: {result}"
            for group, series in groups.items():
                at, got = points(series)[-1]
                final, candidates = expected_rule_values(prom, spec.source, sel, spec, at)
                assert final == pytest.approx(spec.final, rel=1e-12), (name, final)
                assert set(groups) == set(candidates), (name, groups, candidates)
                assert any(
                    math.isclose(got, c, rel_tol=1e-9, abs_tol=1e-15) for c in candidates[group]
                ), (name, at, got, candidates)
                seen[f"{name}{{{spec.by}={group!r}}}" if spec.by else name] = got
            if spec.from_zero:
                raw = prom.query(f"{spec.source}{{{sel}}}[5m]")
                assert all(points(s)[0][1] == 0 for s in raw), (spec.source, raw)
        return True

    poll(
        "every recorded series at the value the traffic implies",
        rules_have_traffic_values,
        DEADLINE,
    )
    assert prom.query(f"{outbound_ratio}{{{sel}}}") == []  # absent, not NaN
    print("recorded:", seen)
    assert seen["pipeconnect:sync_errors:rate5m"] == 0  # a sample, at 0: none refused
    # 3 in 5 minutes, extrapolated up by at most 1.1 scrape intervals past a sampled
    # interval of at least one
    assert 3 / 300 <= seen["pipeconnect:early_pipelining_advertised:rate5m"] < 3 / 300 * 2.2

    # ------------------------------------------------------------ the dashboard's queries
    exprs = [(where, substitute(expr)) for where, expr in dashboard_exprs(load_dashboard())]
    # Outbound mode is off in this test: its labelled series do not exist (they are exported
    # at 0 only with an outbound listener), so the queries over them have no data, ever;
    # its unlabelled counters and gauge are there at 0 and answer like the rest.
    outbound_off = (
        "pipeconnect_outbound_sessions_total",
        "pipeconnect_outbound_cache_lookups_total",
        "pipeconnect_outbound_cache_invalidations_total",
        "pipeconnect_outbound_refused_total",
    )
    off = {w for w, e in exprs if any(name in e for name in outbound_off)}
    assert off, "the dashboard has an outbound row"
    for where in off:
        assert not prom.query(dict(exprs)[where]), where
    exprs = [(w, e) for w, e in exprs if w not in off]
    # No data yet by definition with these three cleartext deliveries; step 2 makes it.
    no_data_yet = {
        "pipeconnect_tls_handshakes_total{": "no TLS handshake yet",
        "changes(pipeconnect_config_last_reload_success_timestamp_seconds": "not reloaded yet",
    }

    def answers() -> dict[str, list[dict[str, Any]]]:
        return {where: prom.query(expr) for where, expr in exprs}

    first = answers()
    empty = {where for where, result in first.items() if not result}
    expected_empty = {w for w, e in exprs if any(marker in e for marker in no_data_yet)}
    assert len(expected_empty) == len(no_data_yet), expected_empty
    assert empty == expected_empty, {w: e for w, e in exprs if w in empty ^ expected_empty}
    # Phase 1 has a value for the rest ('Upstream failures' too: every outcome's series is
    # exported at 0 from the start), though not always a number: a quantile of a histogram
    # that saw no observation within its window is NaN.
    for where, result in first.items():
        if where.startswith(("panel 'Use ratio", "panel 'Advertised-vs-used ratio'")):
            # both ratio panels: used over advertised from the same samples -> exactly 2/3
            assert math.isclose(value(result[0]), 2 / 3, rel_tol=1e-12), (where, result)
        if where.startswith("panel 'Upstream up'"):
            assert value(result[0]) == 1, result
        if where.startswith("panel 'Active sessions'"):
            active = {s["metric"]["listener"]: value(s) for s in result}
            assert active == {"plain": 0, "tls_on_connect": 0}, result

    # the dashboard's variables: label_values(pipeconnect_build_info, job) and (..., instance)
    for label, match in (
        ("job", "pipeconnect_build_info"),
        ("instance", f'pipeconnect_build_info{{job=~"{JOB}"}}'),
    ):
        assert prom.api(f"label/{label}/values", **{"match[]": match}) == [
            {"job": JOB, "instance": instance}[label]
        ]

    # ------------------------------------------------------------ 2: the missing traffic
    # One TLS session (implicit TLS, then QUIT): a handshake by version.
    context = ssl.create_default_context(cafile=tls_files["ca"])
    with (
        socket.create_connection(("127.0.0.1", implicit_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        f = tls.makefile("rwb")
        assert f.readline().startswith(b"220"), "no banner over TLS"
        f.write(b"QUIT\r\n")
        f.flush()
        assert f.readline().startswith(b"221")
    # A reload (SIGHUP): the annotation's timestamp changes.
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    # The MTA gone: the next session ends upstream-down (the client gets 421).
    postfix.stop()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        reply = s.makefile("rb").readline()
    assert reply.startswith(b"421"), reply

    def all_answer() -> dict[str, list[dict[str, Any]]] | None:
        now = answers()
        missing = [w for w, result in now.items() if not result]
        assert not missing, f"no data for {missing}"
        # and a number (the 'Session duration' quantiles: the upstream-down session took the
        # plain listener's histogram from 3 to 4, a rate above 0)
        nan = [w for w, result in now.items() if any(math.isnan(value(s)) for s in result)]
        assert not nan, f"NaN for {nan}"
        return now

    last = poll("data for every dashboard query", all_answer, DEADLINE)
    by_expr = {expr: last[where] for where, expr in exprs}

    def answer_for(marker: str) -> list[dict[str, Any]]:
        (result,) = [r for e, r in by_expr.items() if marker in e]
        return result

    tls_versions = answer_for("pipeconnect_tls_handshakes_total{")
    assert {s["metric"]["version"] for s in tls_versions} == {"TLSv1.3"}, tls_versions
    failures = answer_for('outcome=~"upstream-.*"')
    failed = {s["metric"]["outcome"] for s in failures if value(s) > 0}
    assert failed == {"upstream-down"}, failures
    for where, result in last.items():
        print(where, [(s["metric"], s["value"][1]) for s in result])

    # ------------------------------------------------------------ 3: the proxy stops
    proxy.stop()
    alert = f'ALERTS{{alertname="PipeconnectTargetDown",{sel}'

    def target_down_fired() -> bool | None:
        assert prom.query(f"up{{{sel}}} == 0"), "still scraped"
        fired = prom.query(f'{alert},for_override="3s",alertstate="firing"}}')
        return bool(fired) or None

    poll("the 3s copy of PipeconnectTargetDown firing", target_down_fired, DEADLINE)
    # it went pending first (ALERTS keeps the pending samples), then firing
    pending = prom.query(f'{alert},for_override="3s",alertstate="pending"}}[1m]')
    firing = prom.query(f'{alert},for_override="3s",alertstate="firing"}}[1m]')
    assert pending and firing, (pending, firing)
    assert points(pending[0])[-1][0] < points(firing[0])[0][0]
    # The shipped rule (for: 5m, as shipped): pending, not yet firing.
    shipped = prom.query(f'{alert},for_override=""}}')
    assert [s["metric"]["alertstate"] for s in shipped] == ["pending"], shipped
    assert shipped[0]["metric"]["severity"] == "critical"
    rules = {(g["name"], r["name"]): r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert rules[("pipeconnect.alerts", "PipeconnectTargetDown")]["duration"] == 300
    assert rules[("pipeconnect.alerts", "PipeconnectTargetDown")]["state"] == "pending"
    assert rules[("test.short-for", "PipeconnectTargetDown")]["state"] == "firing"
    # every shipped rule evaluated without error against this live data
    bad = {k: r.get("lastError") for k, r in rules.items() if r["health"] != "ok"}
    assert not bad, bad
