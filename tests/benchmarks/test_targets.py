"""benchmarks/targets.py: issue 12's per-repeat ratios, from a hand-made run (no timing)."""

from __future__ import annotations

from benchmarks.targets import b1_ratios, b2_ratios, render


def _b1(peer: str, repeat: int, gbps: float, case: str = "up") -> dict[str, object]:
    return {"peer": peer, "case": case, "repeat": repeat, "gbps": gbps, "intact": True}


def _b2(peer: str, repeat: int, p50: float, p99: float) -> dict[str, object]:
    return {"peer": peer, "repeat": repeat, "p50_us": p50, "p99_us": p99}


def test_b1_ratios_are_taken_within_a_repeat_against_each_peers_reference() -> None:
    runs = [
        _b1("socat2-b256k", 0, 1.0),
        _b1("tether", 0, 0.9),
        _b1("socat2-b256k", 1, 2.0),
        _b1("tether", 1, 2.2),
        _b1("stunnel2", 0, 0.5),
        _b1("tether-tls", 0, 0.4),
        {**_b1("tether-tls", 1, 9.0), "intact": False},  # a broken run is no figure
    ]
    ratios = b1_ratios(runs)
    assert ratios["tether", "up"] == [0.9, 1.1]
    assert ratios["tether-tls", "up"] == [0.8]
    assert ("socat2-b256k", "up") not in ratios


def test_b2_ratios_are_of_added_latency_and_skip_a_reference_that_added_nothing() -> None:
    runs = [
        _b2("direct", 0, 50, 100),
        _b2("socat2", 0, 70, 100),  # added 20 at p50, nothing at p99
        _b2("tether", 0, 80, 160),
        _b2("direct", 1, 10, 20),
        _b2("socat2", 1, 30, 60),
        _b2("tether", 1, 40, 140),
    ]
    ratios = b2_ratios(runs)
    assert ratios["tether", "p50"] == ([1.5, 1.5], 0)
    assert ratios["tether", "p99"] == ([3.0], 1)


def test_render_names_the_verdict() -> None:
    data = {
        "meta": {"time": "t", "commit": "abcdef0123", "src_commit": "0123abcdef", "command": "c"},
        "benchmarks": {
            "B1": {"runs": [_b1("socat2-b256k", 0, 1.0), _b1("tether", 0, 0.9)]},
            "B2": {"runs": [_b2("direct", 0, 10, 20), _b2("socat2", 0, 30, 40),
                            _b2("tether", 0, 35, 90)]},
        },
    }  # fmt: skip
    text = render(data)
    assert "| B1 up, GB/s / socat2-b256k's | tether | 0.90 (0.90-0.90) | >= 1.0 | missed |" in text
    assert "| B2 added p50 / socat2's | tether | 1.25 (1.25-1.25) | <= 1.5 | met |" in text
    assert "| B2 added p99 / socat2's | tether | 3.50 (3.50-3.50) | <= 1.5 | missed |" in text
