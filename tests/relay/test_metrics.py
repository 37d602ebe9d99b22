"""The policy verdict tally reads, at scrape time, as Prometheus's own types would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from policies.base import Mode, Outcome, Stage
from relay.metrics import Metrics

LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025)
LATENCY_BUCKETS += (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATIONS = (0.0001, 0.0005, 0.0007, 0.003, 0.2, 0.2, 42.0)


def _lines(registry: CollectorRegistry, prefix: str) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(
        line
        for line in text.splitlines()
        if line.startswith(prefix) and "_created" not in line
    )


def test_verdicts_and_durations_read_as_a_counter_and_a_histogram() -> None:
    metrics = Metrics("test")
    reference = CollectorRegistry()
    counter = Counter(
        "relay_policy_verdicts_total",
        "Verdicts.",
        ["policy", "stage", "outcome", "mode"],
        registry=reference,
    )
    histogram = Histogram(
        "relay_policy_check_duration_seconds",
        "Durations.",
        ["policy"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    for number, seconds in enumerate(DURATIONS):
        outcome = Outcome.REFUSE if number % 3 == 0 else Outcome.PASS
        for policy in ("exclusion", "optout_link"):
            key = (policy, Stage.DATA, outcome, Mode.ENFORCE)
            metrics.policy_verdicts.add(key, seconds)
            counter.labels(*key).inc()
            histogram.labels(policy).observe(seconds)
    for prefix in ("relay_policy_verdicts_total", "relay_policy_check_duration"):
        assert _lines(metrics.registry, prefix) == _lines(reference, prefix)
    assert (
        metrics.registry.get_sample_value(
            "relay_policy_verdicts_total",
            {
                "policy": "exclusion",
                "stage": "data",
                "outcome": "refuse",
                "mode": "enforce",
            },
        )
        == 3
    )


def test_nothing_observed_exports_no_samples() -> None:
    metrics = Metrics("test")
    assert _lines(metrics.registry, "relay_policy_verdicts_total{") == []
    assert _lines(metrics.registry, "relay_policy_check_duration_seconds_") == []
