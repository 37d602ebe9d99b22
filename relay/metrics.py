"""Every Prometheus metric the relay exports, on a registry of its own.

Label values come from sets bounded by code or config (policy, reason, result,
account names from relay.toml); never an address, a domain, an id or error text.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_SIZE_BUCKETS = (
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
)


class PolicyVerdicts(Collector):
    """``relay_policy_verdicts_total{policy,stage,outcome,mode}`` and
    ``relay_policy_check_duration_seconds{policy}``, kept as plain numbers.

    Every check of every message and recipient lands here, several times per
    message: a dict lookup and a few additions cost a fraction of what a labelled
    Counter and Histogram do (a lock each, a bucket search in Python). The
    registry reads them at scrape time. Only the event loop writes them.
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._bounds = buckets
        self._verdicts: dict[tuple[str, str, str, str], int] = {}
        self._durations: dict[str, _Durations] = {}

    def add(self, key: tuple[str, str, str, str], seconds: float) -> None:
        """One verdict: ``key`` is (policy, stage, outcome, mode)."""
        verdicts = self._verdicts
        verdicts[key] = verdicts.get(key, 0) + 1
        durations = self._durations.get(key[0])
        if durations is None:
            durations = self._durations[key[0]] = _Durations(len(self._bounds) + 1)
        durations.buckets[bisect_left(self._bounds, seconds)] += 1
        durations.total += seconds

    def collect(self) -> Iterator[Metric]:
        """The two families, as the registry asks for them."""
        verdicts = CounterMetricFamily(
            "relay_policy_verdicts",
            "Verdicts of the policy checks, passes included.",
            labels=["policy", "stage", "outcome", "mode"],
        )
        for key, count in list(self._verdicts.items()):
            verdicts.add_metric([str(part) for part in key], count)
        yield verdicts
        durations = HistogramMetricFamily(
            "relay_policy_check_duration_seconds",
            "Time one policy check took.",
            labels=["policy"],
        )
        bounds = [*(repr(float(b)) for b in self._bounds), "+Inf"]
        for policy, seen in list(self._durations.items()):
            cumulative = list(accumulate(seen.buckets))
            durations.add_metric(
                [policy], list(zip(bounds, cumulative, strict=True)), seen.total
            )
        yield durations


class _Durations:
    __slots__ = ("buckets", "total")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size
        self.total = 0.0


class Metrics:
    """The relay's metric objects; one instance per running relay (tests run many)."""

    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Info(
            "relay_build", "Version of the running relay.", registry=r
        )
        self.build_info.info({"version": version})
        self.smtp_sessions_total = Counter(
            "relay_smtp_sessions_total",
            "SMTP sessions by how they ended.",
            ["result"],
            registry=r,
        )
        self.smtp_sessions_active = Gauge(
            "relay_smtp_sessions_active", "SMTP sessions open now.", registry=r
        )
        self.smtp_protocol_errors_total = Counter(
            "relay_smtp_protocol_errors_total",
            "Commands refused by the SMTP protocol layer (syntax, sequence, TLS), "
            "by reason.",
            ["reason"],
            registry=r,
        )
        self.auth_attempts_total = Counter(
            "relay_auth_attempts_total",
            "SMTP AUTH attempts by result (success, failure, locked_out).",
            ["result"],
            registry=r,
        )
        self.messages_received_total = Counter(
            "relay_messages_received_total",
            "Messages accepted and queued, by account.",
            ["account"],
            registry=r,
        )
        self.messages_refused_total = Counter(
            "relay_messages_refused_total",
            "Messages refused at MAIL FROM or DATA, by account, policy and reason.",
            ["account", "policy", "reason"],
            registry=r,
        )
        self.recipients_accepted_total = Counter(
            "relay_recipients_accepted_total",
            "Recipients accepted at RCPT TO, by account.",
            ["account"],
            registry=r,
        )
        self.recipients_refused_total = Counter(
            "relay_recipients_refused_total",
            "Recipients refused at RCPT TO, by account, policy and reason.",
            ["account", "policy", "reason"],
            registry=r,
        )
        self.spam_subject_warnings_total = Counter(
            "relay_spam_subject_warnings_total",
            "Messages whose Subject holds spam-trigger phrases (warned, not refused).",
            ["account"],
            registry=r,
        )
        self.policy_errors_total = Counter(
            "relay_policy_errors_total",
            "Policy checks that failed or timed out.",
            ["policy"],
            registry=r,
        )
        self.account_rate_ratio = Gauge(
            "relay_account_rate_ratio",
            "Each account's statistic over its threshold (1 = at the threshold).",
            ["account", "statistic"],
            registry=r,
        )
        self.account_state = Gauge(
            "relay_account_state",
            "1 for each account's current state (ok, warning, throttled, suspended).",
            ["account", "state"],
            registry=r,
        )
        self.feedback_events_total = Counter(
            "relay_feedback_events_total",
            "Events counted for an account's reputation, by kind (sent, bounce, "
            "block, unsubscribe, complaint, click, spamtrap_hit).",
            ["account", "kind"],
            registry=r,
        )
        self.feedback_received_total = Counter(
            "relay_feedback_received_total",
            "Feedback taken in, by channel (one_click, page, api, dsn, arf, "
            "mailto, smtp) and result (recorded, duplicate, ignored, invalid, "
            "unattributed, refused, error).",
            ["channel", "result"],
            registry=r,
        )
        self.reloads_total = Counter(
            "relay_config_reloads_total",
            "Reloads of relay.toml (SIGHUP, relay reload), applied or refused.",
            ["result"],
            registry=r,
        )
        self.policy_workers_ready = Gauge(
            "relay_policy_workers_ready",
            "Policy worker processes ready to check messages (0: checks run in "
            "the relay process).",
            registry=r,
        )
        self.policy_worker_failures_total = Counter(
            "relay_policy_worker_failures_total",
            "Policy worker processes that exited, hung (killed) or failed to start.",
            ["reason"],
            registry=r,
        )
        self.policy_verdicts = PolicyVerdicts(_LATENCY_BUCKETS)
        """relay_policy_verdicts_total and relay_policy_check_duration_seconds."""
        r.register(self.policy_verdicts)
        self.message_size_bytes = Histogram(
            "relay_message_size_bytes",
            "Size of accepted messages.",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.accept_duration_seconds = Histogram(
            "relay_accept_duration_seconds",
            "From the end of DATA to the 250 reply (parse and durable commit).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_messages = Gauge(
            "relay_queue_messages",
            "Messages in the queue, by state (queued, in_flight).",
            ["state"],
            registry=r,
        )
        self.queue_recipients = Gauge(
            "relay_queue_recipients", "Recipients still owed a delivery.", registry=r
        )
        self.queue_oldest_message_age_seconds = Gauge(
            "relay_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue.",
            registry=r,
        )
        self.delivery_attempts_total = Counter(
            "relay_delivery_attempts_total",
            "Delivery attempts by result (delivered, deferred, bounced, expired, "
            "partial, error).",
            ["result"],
            registry=r,
        )
        self.delivery_recipients_total = Counter(
            "relay_delivery_recipients_total",
            "Recipient outcomes of delivery attempts (delivered, deferred, bounced, "
            "expired).",
            ["result"],
            registry=r,
        )
        self.delivery_duration_seconds = Histogram(
            "relay_delivery_duration_seconds",
            "Duration of one delivery attempt to the upstream.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time_seconds = Histogram(
            "relay_queue_time_seconds",
            "From acceptance to delivery of a message.",
            buckets=(
                *_LATENCY_BUCKETS,
                30.0,
                60.0,
                300.0,
                900.0,
                3600.0,
                14400.0,
                86400.0,
            ),
            registry=r,
        )
        self.upstream_connections_total = Counter(
            "relay_upstream_connections_total",
            "Connections opened to the upstream, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.dsn_generated_total = Counter(
            "relay_dsn_generated_total",
            "Delivery status notifications queued for envelope senders.",
            registry=r,
        )
        self.bounces_total = Counter(
            "relay_bounces_total",
            "Recipients bounced at delivery, by account and type (hard, soft).",
            ["account", "type"],
            registry=r,
        )
        self.storage_errors_total = Counter(
            "relay_storage_errors_total",
            "Store operations that failed, by kind (full, unavailable).",
            ["kind"],
            registry=r,
        )
