"""Metrics as operators see them: a real Exim 4.96 client sends three messages through the
proxy (run as `pipeconnect-proxy serve`, metrics endpoint on) to a real Postfix 3.7; the
scrape says exactly that, and the recording rule turns it into the use ratio 2/3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.mta import EximClient, Postfix, deliveries, free_port
from tests.proxyproc import ProxyProcess

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml"


@pytest.fixture
def proxy_with_metrics(tmp_path: Path) -> Iterator[Callable[[int], tuple[ProxyProcess, int]]]:
    """`make(upstream_port) -> (proxy, metrics_port)`: the proxy with its metrics endpoint."""
    made: list[ProxyProcess] = []

    def make(upstream_port: int) -> tuple[ProxyProcess, int]:
        port = free_port()
        proc = ProxyProcess(tmp_path, upstream_port, metrics={"listen": f"127.0.0.1:{port}"})
        made.append(proc)
        return proc.start(), port

    yield make
    for proc in made:
        proc.stop()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_exim_three_messages_scraped(
    postfix: Postfix,
    exim_client_factory: Callable[..., EximClient],
    proxy_with_metrics: Callable[[int], tuple[ProxyProcess, int]],
    tmp_path: Path,
) -> None:
    proxy, port = proxy_with_metrics(postfix.port)
    status, health = get(port, "/healthz")
    assert status == 200 and health.startswith("ok: upstream 127.0.0.1:"), health
    exim = exim_client_factory(proxy.port)
    logs = [exim.send("alice@client.test", "box@dest.test", f"n{n}\n".encode()) for n in (1, 2, 3)]
    lines = [deliveries(log)[-1] for log in logs]
    assert [d.early_pipelined for d in lines] == [False, True, True], logs
    postfix.wait_messages(3)

    status, text = get(port, "/metrics")
    assert status == 200
    (tmp_path / "scrape.txt").write_text(text)  # kept by pytest for a look afterwards
    s = samples(text)

    def v(name: str, **labels: str) -> float:
        return s[(name, tuple(sorted(labels.items())))]

    # Exim closes each connection with QUIT; each session had the keyword in its EHLO reply
    assert v("pipeconnect_sessions_total", listener="plain", outcome="quit") == 3, text
    assert v("pipeconnect_early_pipelining_advertised_total") == 3
    assert v("pipeconnect_early_pipelining_used_total") == 2
    assert v("pipeconnect_early_input_refused_total", action="defer") == 0
    # deliveries 2 and 3 each skipped the wait for the banner and for the EHLO reply
    assert v("pipeconnect_round_trips_saved_total") == 4
    assert v("pipeconnect_time_saved_seconds_total") > 0
    assert v("pipeconnect_relayed_messages_total") == 3
    assert v("pipeconnect_relayed_recipients_total") == 3
    assert v("pipeconnect_upstream_banner_seconds_count") == 3
    assert v("pipeconnect_upstream_up") == 1
    assert v("pipeconnect_active_sessions", listener="plain") == 0

    # What the recording rule makes of it: the counters went from 0 to these values within
    # five minutes; promtool evaluates pipeconnect:early_pipelining_use_ratio:rate5m.
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI=true, so not skipping: promtool unavailable (bash .ci/install)")
        return
    lbl = '{job="pipeconnect",instance="mx"}'
    series = [
        (
            f"pipeconnect_early_pipelining_{name}_total{lbl}",
            v(f"pipeconnect_early_pipelining_{name}_total"),
        )
        for name in ("advertised", "used")
    ]
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": n, "values": f"0 0 {val:g} {val:g} {val:g} {val:g}"}
                    for n, val in series
                ],
                "promql_expr_test": [
                    {
                        "expr": "round(pipeconnect:early_pipelining_use_ratio:rate5m, 0.0001)",
                        "eval_time": "5m",
                        "exp_samples": [
                            {
                                "labels": lbl,
                                "value": 0.6667,  # 2 used / 3 advertised
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "ratio_test.yml"
    path.write_text(json.dumps(test, indent=1))
    result = subprocess.run(
        [promtool, "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
