"""The service's histograms and counters as the admin endpoint reads them: Prometheus'
"le" buckets, and snapshots that later counting does not change."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tether.admin.metrics import _histogram
from tether.aio.service import Histogram, Service
from tether.protocol.codes import CloseCode


def test_a_value_on_a_bound_counts_in_that_bucket_and_the_rest_past_the_last() -> None:
    histogram = Histogram((1.0, 5.0))
    for value in (0.2, 1.0, 1.5, 5.0, 7.0, 700.0):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot.counts == (2, 2, 2)
    assert snapshot.total == 714.7
    histogram.observe(0.1)
    assert snapshot.counts == (2, 2, 2)  # a snapshot is frozen

    text = "".join(
        f"{s.name}{s.labels} {s.value}\n"
        for s in _histogram("t_seconds", "test", snapshot).samples
        if s.name.endswith("_bucket")
    )
    assert text == (
        "t_seconds_bucket{'le': '1.0'} 2\n"
        "t_seconds_bucket{'le': '5.0'} 4\n"
        "t_seconds_bucket{'le': '+Inf'} 6\n"
    )


def test_statistics_copy_the_counts_by_code() -> None:
    service = Service()
    service.note_rejected(CloseCode.OVERLOADED)
    before = service.statistics()
    service.note_rejected(CloseCode.OVERLOADED)
    service.note_rejected(CloseCode.UNAUTHORIZED)
    assert before.rejects_by_reason == {"OVERLOADED": 1}
    after = service.statistics()
    assert after.rejects_by_reason == {"OVERLOADED": 2, "UNAUTHORIZED": 1}
    assert after.rejected_total == 3
    assert after.accepting is False  # not listening
    assert after.outage_seconds.counts == (0,) * 11


def test_the_exposition_parses() -> None:
    from prometheus_client import generate_latest

    from tether.admin.metrics import registry_for

    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(registry_for(Service())).decode())
    }
    for name in (
        "tether_sessions",
        "tether_session_starts",
        "tether_session_ends",
        "tether_resumes",
        "tether_outage_seconds",
        "tether_resume_seconds",
        "tether_bytes_sent",
        "tether_bytes_received",
        "tether_replay_buffered_bytes",
        "tether_handshakes_in_flight",
        "tether_rejects",
        "tether_accepting",
    ):
        assert name in families, name
    assert families["tether_outage_seconds"].type == "histogram"
    assert families["tether_resumes"].type == "counter"
