"""What Prometheus would scrape from a ``Metrics``, through the registry's public API (not
prometheus-client's internals)."""

from __future__ import annotations

from proxy.metrics import NAMESPACE, Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of the series ``pipeconnect_<name>{labels}``, which must exist: every
    series the tests read is exported (at 0) before the first event."""
    full = f"{NAMESPACE}_{name}"
    value = metrics.registry.get_sample_value(full, labels)
    assert value is not None, f"no series {full}{labels}"
    return value
