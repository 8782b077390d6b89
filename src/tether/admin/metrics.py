"""The admin endpoint's ``/metrics``: a Prometheus collector that reads a running server's
or client's live statistics (``Service.statistics()``) each time it is scraped.

Nothing is counted twice: the service keeps its own counters (aio/service.py) and this
module only renders them in the exposition format, through ``prometheus-client``. The
names are listed in docs/operations.md ("Admin endpoint"); changing one changes both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import __version__, allocator
from ..aio.service import HistogramSnapshot, Service, TrafficStatistics

__all__ = ["HeapCollector", "ServiceCollector", "registry_for"]


class ServiceCollector(Collector):
    """Every ``tether_*`` metric of one service, read at scrape time."""

    def __init__(
        self, service: Service, traffic: Callable[[], TrafficStatistics] | None = None
    ) -> None:
        self.service = service
        self.traffic = traffic or service.traffic

    def collect(self) -> Iterator[Metric]:
        stats = self.service.statistics()
        traffic = self.traffic()
        info = GaugeMetricFamily(
            "tether_info", "This tether process: its role and version", labels=["role", "version"]
        )
        info.add_metric([stats.role, __version__], 1)
        yield info
        sessions = GaugeMetricFamily(
            "tether_sessions",
            "Sessions open now, by state (setup: a client session not yet established)",
            labels=["state"],
        )
        sessions.add_metric(["attached"], stats.attached)
        sessions.add_metric(["detached"], stats.detached)
        sessions.add_metric(["setup"], stats.sessions - stats.attached - stats.detached)
        yield sessions
        yield CounterMetricFamily(
            "tether_session_starts", "Sessions started", value=stats.sessions_total
        )
        ends = CounterMetricFamily(
            "tether_session_ends", "Sessions ended, by close code", labels=["code"]
        )
        for code, count in sorted(stats.ends_by_code.items()):
            ends.add_metric([code], count)
        yield ends
        yield CounterMetricFamily(
            "tether_resumes", "Sessions resumed on a new link", value=stats.resumes_total
        )
        yield _histogram(
            "tether_outage_seconds",
            "Outages that ended in a resume: from the link seen lost to the session resumed",
            stats.outage_seconds,
        )
        yield _histogram(
            "tether_resume_seconds",
            "Resumes: from the new link's TCP connection (before TLS) to the session resumed",
            stats.resume_seconds,
        )
        yield CounterMetricFamily(
            "tether_bytes_sent",
            "Application bytes this end took from its local side and sent to its peer",
            value=traffic.bytes_sent,
        )
        yield CounterMetricFamily(
            "tether_bytes_received",
            "Application bytes this end received from its peer and delivered",
            value=traffic.bytes_received,
        )
        yield GaugeMetricFamily(
            "tether_replay_buffered_bytes",
            "Bytes held now in replay buffers until the peer acknowledges them",
            value=traffic.replay_buffered,
        )
        yield GaugeMetricFamily(
            "tether_handshakes_in_flight",
            "Links connected whose handshake has not finished",
            value=stats.handshakes_in_flight,
        )
        rejects = CounterMetricFamily(
            "tether_rejects",
            "Setups and resumes refused (server) or refused to us (client), by reason code",
            labels=["reason"],
        )
        for reason, count in sorted(stats.rejects_by_reason.items()):
            rejects.add_metric([reason], count)
        yield rejects
        yield CounterMetricFamily(
            "tether_handshakes_failed",
            "Links that never reached a session",
            value=stats.handshakes_failed,
        )
        yield CounterMetricFamily(
            "tether_fallbacks",
            "Client sessions that went straight to the fallback, without reliability",
            value=stats.fallbacks_total,
        )
        yield GaugeMetricFamily(
            "tether_accepting", "1 while new sessions are accepted", value=int(stats.accepting)
        )
        memory = self.service.memory()
        if memory is not None:
            yield GaugeMetricFamily(
                "tether_memory_budget_bytes",
                "Bytes all sessions' replay buffers may hold together (--memory-budget)",
                value=memory.total,
            )
            yield GaugeMetricFamily(
                "tether_memory_budget_used_bytes",
                "Bytes in replay buffers now, charged to the budget",
                value=memory.used,
            )
            yield GaugeMetricFamily(
                "tether_memory_budget_committed_bytes",
                "Bytes no new session may take: per session, the larger of used and reserved",
                value=memory.committed,
            )
            yield GaugeMetricFamily(
                "tether_memory_budget_held_bytes",
                "Bytes sessions hold for backends that are not reading, counted against "
                "new sessions and the high-water mark",
                value=memory.held,
            )


class HeapCollector(Collector):
    """The process's heap trims (tether.allocator), where it trims: the RSS that
    ``process_resident_memory_bytes`` shows falling after a peak is these."""

    def collect(self) -> Iterator[Metric]:
        trimmer = allocator.running()
        if trimmer is None:
            return
        yield CounterMetricFamily(
            "tether_heap_trims",
            "Times the process gave freed heap memory back to the system (malloc_trim)",
            value=trimmer.trims,
        )
        yield CounterMetricFamily(
            "tether_heap_released_bytes",
            "Resident bytes those trims gave back (RSS before minus after)",
            value=trimmer.released,
        )
        yield CounterMetricFamily(
            "tether_heap_trim_seconds",
            "Time those trims took, during which the event loop served nothing else",
            value=trimmer.seconds,
        )


def _histogram(name: str, documentation: str, snapshot: HistogramSnapshot) -> Metric:
    buckets: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip((*snapshot.bounds, float("inf")), snapshot.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=snapshot.total)


def registry_for(
    service: Service, traffic: Callable[[], TrafficStatistics] | None = None
) -> CollectorRegistry:
    """A registry of the service's metrics and this process's (CPU, memory, files);
    ``traffic`` replaces ``service.traffic`` (the endpoint's cached one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service, traffic))
    registry.register(HeapCollector())
    ProcessCollector(registry=registry)
    return registry
