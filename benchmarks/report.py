"""docs/benchmarks.md and docs/img/*.png from results/latest.json.

Everything on the page is computed from the JSON, except the hand-written analysis, which
is read from benchmarks/analysis.md and appended as it is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, percentile, summary
from benchmarks.peers import PEERS
from benchmarks.targets import (
    REFERENCE,
    TARGET_B1,
    TARGET_B2,
    TARGET_B4_CPU_PCT,
    TARGET_B4_KIB,
    added_latency,
    added_ratios,
    b1_ratios,
    b2_ratios,
    ratio_text,
    ratios,
)

HERE = Path(__file__).resolve().parent
ANALYSIS = HERE / "analysis.md"


def smm(values: list[float], digits: int = 2) -> tuple[str, str, str]:
    s = summary(values)
    return fmt(s["median"], digits), fmt(s["min"], digits), fmt(s["max"], digits)


def label(name: str) -> str:
    return PEERS[name].describe() if name in PEERS else name


class Page:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.targets: list[tuple[str, str, str, str]] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(row) + " |")
        self.add("")

    def target(self, what: str, measured: str, ok: bool | None, margin: str) -> None:
        verdict = "n/a" if ok is None else ("**met**" if ok else "**missed**")
        self.targets.append((what, measured, verdict, margin))


def meta_line(b: dict[str, Any]) -> str:
    m = b.get("meta", {})
    return (
        f"Made with `{m.get('command', '?')}` at {m.get('time', '?')}, commit "
        f"{m.get('commit', '?')} (src/ at {m.get('src_commit', '?')}"
        f"{', modified' if m.get('dirty_src') else ''}), scale "
        f"`{m.get('scale', '?')}`, {m.get('seconds', '?')} s."
    )


def skipped_lines(page: Page, b: dict[str, Any]) -> None:
    for name, why in b.get("skipped", {}).items():
        page.add(f"- skipped {name}: {why}")
    for note in b.get("notes", []):
        page.add(f"- note: {note}")
    if b.get("skipped") or b.get("notes"):
        page.add("")


# -- B1 -----------------------------------------------------------------------------------


def b1(page: Page, b: dict[str, Any], img: Path | None) -> None:
    runs = b["runs"]
    cfg = b["config"]
    page.add(
        "## B1 bulk throughput",
        "",
        f"{cfg['bytes'] / 2**30:g} GiB per run through each peer, {cfg['repeats']} repeats, "
        "peers interleaved within each repeat. GB/s = 1e9 payload bytes per second; `both` "
        "counts the bytes of both directions. The ratio columns are the median (min-max) of "
        "tether's per-repeat ratio to that peer.",
        "",
        meta_line(b),
        "",
    )
    skipped_lines(page, b)
    peers = list(dict.fromkeys(r["peer"] for r in runs))
    per_repeat = b1_ratios(runs)
    whole = [r for r in runs if r.get("intact", True)]  # a broken run is no figure (targets.py)
    for case in cfg["cases"]:
        cr = [r for r in whole if r["case"] == case]
        rows = []
        for p in peers:
            v = [r["gbps"] for r in cr if r["peer"] == p]
            med, lo, hi = smm(v)
            row = [label(p), med, lo, hi]
            for ref in ("socat2-b256k", "socat2", "direct"):
                clear = p.startswith("tether") and not (p in PEERS and PEERS[p].tls)
                rr = ratios(cr, "gbps", p, ref, "repeat") if clear else []  # TLS: own section
                row.append(ratio_text(rr))
            rows.append(row)
        page.add(f"### {case}", "")
        page.table(
            ["peer", "median GB/s", "min", "max", "tether / socat -b256k 2 hops",
             "tether / socat 2 hops", "tether / direct"],
            rows,
        )  # fmt: skip
        tv = [r["gbps"] for r in cr if r["peer"] == "tether"]
        big = [r["gbps"] for r in cr if r["peer"] == "socat2-b256k"]
        rr = per_repeat.get(("tether", case), [])
        if rr:
            m, want = percentile(rr, 50), TARGET_B1["socat2-b256k"]
            page.target(
                f"B1 {case}: >= {want:.1f}x socat -b 262144 two hops (issue 12; issue 4: 0.8x)",
                f"{ratio_text(rr)} per repeat; medians {percentile(tv, 50):.2f} vs "
                f"{percentile(big, 50):.2f} GB/s",
                m >= want,
                f"{m / want - 1:+.0%} against {want:.1f}x",
            )
        rr = ratios(cr, "gbps", "tether", "socat2", "repeat")
        if rr:
            m = percentile(rr, 50)
            page.target(
                f"B1 {case}: > socat two hops, default buffer",
                f"{ratio_text(rr)} per repeat",
                m > 1.0,
                f"{m - 1:+.0%}",
            )
    if img is not None and runs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / max(1, len(peers))
        for i, p in enumerate(peers):
            meds, errs_lo, errs_hi = [], [], []
            for case in cfg["cases"]:
                v = [r["gbps"] for r in runs if r["case"] == case and r["peer"] == p]
                s = summary(v)
                meds.append(s["median"])
                errs_lo.append(s["median"] - s["min"])
                errs_hi.append(s["max"] - s["median"])
            xs = [j + i * width for j in range(len(cfg["cases"]))]
            ax.bar(xs, meds, width, yerr=[errs_lo, errs_hi], capsize=3, label=p)
        ax.set_xticks([j + width * (len(peers) - 1) / 2 for j in range(len(cfg["cases"]))])
        ax.set_xticklabels(cfg["cases"])
        ax.set_ylabel("GB/s (median, whiskers min-max)")
        ax.set_title(f"B1 bulk throughput, {cfg['bytes'] / 2**30:g} GiB per run, loopback")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "b1_throughput.png", dpi=100)
        plt.close(fig)
        page.add("![B1 throughput](img/b1_throughput.png)", "")


# -- B2 -----------------------------------------------------------------------------------


def b2(page: Page, b: dict[str, Any], img: Path | None) -> None:
    runs = b["runs"]
    cfg = b["config"]
    page.add(
        "## B2 request/response latency",
        "",
        f"{cfg['count']} round trips of 64 bytes per run (after 200 warm-up), one at a time, "
        f"{cfg['repeats']} repeats interleaved. Microseconds. *Added* is the peer's minus "
        "direct's, per repeat.",
        "",
        meta_line(b),
        "",
    )
    skipped_lines(page, b)
    peers = list(dict.fromkeys(r["peer"] for r in runs))
    added = added_latency(runs)

    def added_median(p: str, q: str) -> float:
        return percentile(list(added.get(p, {}).get(q, {}).values()), 50)

    rows = []
    for p in peers:
        p50 = smm([r["p50_us"] for r in runs if r["peer"] == p], 1)
        p99 = smm([r["p99_us"] for r in runs if r["peer"] == p], 1)
        rows.append(
            [label(p), *p50, *p99, fmt(added_median(p, "p50_us"), 1),
             fmt(added_median(p, "p99_us"), 1)]
        )  # fmt: skip
    page.table(
        ["peer", "p50 median", "min", "max", "p99 median", "min", "max", "added p50",
         "added p99"],
        rows,
    )  # fmt: skip
    per_repeat = b2_ratios(runs)
    for q in ("p50", "p99"):
        rr, left_out = per_repeat.get(("tether", q), ([], 0))
        if rr:
            m = percentile(rr, 50)
            page.target(
                f"B2 {q}: added latency <= {TARGET_B2}x socat two hops'",
                f"{ratio_text(rr)} per repeat"
                + (f" ({left_out} left out: socat added nothing)" if left_out else "")
                + f"; medians +{added_median('tether', q + '_us'):.1f} vs "
                f"+{added_median('socat2', q + '_us'):.1f} us",
                m <= TARGET_B2,
                f"{1 - m / TARGET_B2:+.0%} headroom",
            )
    cdf = b.get("extra", {}).get("cdf_us", {})
    if img is not None and cdf:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        ys = [q / 200 for q in range(1, 201)]
        for p, xs in cdf.items():
            ax.plot(xs, ys, label=p)
        ax.set_xscale("log")
        ax.set_xlabel("round-trip time, us (log)")
        ax.set_ylabel("fraction of round trips")
        ax.set_title("B2 64-byte request/response, all repeats pooled")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "b2_latency_cdf.png", dpi=100)
        plt.close(fig)
        page.add("![B2 latency CDF](img/b2_latency_cdf.png)", "")


# -- B3 -----------------------------------------------------------------------------------


def b3(page: Page, b: dict[str, Any], img: Path | None) -> None:
    runs = b["runs"]
    cfg = b["config"]
    page.add(
        "## B3 resume time",
        "",
        f"Client and server in two network namespaces joined by a veth (198.18.0.0/30); "
        f"method: {cfg['method']}. A pinger does a 64-byte round trip every 10 ms through "
        "the peer; each trial cuts the path for a duration from a fixed sequence over "
        f"{min(cfg['cut_seconds']):g}-{max(cfg['cut_seconds']):g} s (the same sequence for "
        "every peer), restores it and measures from just before the restore to the arrival "
        f"of the pinger's next reply. tether: {cfg['tether_settings']}.",
        "",
        meta_line(b),
        "",
    )
    skipped_lines(page, b)
    pct = b.get("extra", {}).get("percentiles", {})
    rows = []
    for p, v in pct.items():
        rows.append(
            [label(p), str(v["n"]), str(v["failed"]), fmt(v["p50_s"], 3), fmt(v["p99_s"], 3),
             fmt(v["max_s"], 3)]
        )  # fmt: skip
    if rows:
        page.table(["peer", "trials", "not resumed", "p50 s", "p99 s", "max s"], rows)
    if "tether" in pct:
        v = pct["tether"]
        page.target(
            "B3: p99 resume < 1 s after restore (defaults)",
            f"p99 {v['p99_s']:.3f} s over {v['n']} trials ({v['failed']} not resumed)",
            v["p99_s"] < 1.0 and v["failed"] == 0,
            f"{(1.0 - v['p99_s']):+.3f} s",
        )
    if img is not None and runs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for p in dict.fromkeys(r["peer"] for r in runs):
            pts = [(r["cut_s"], r["resume_s"]) for r in runs if r["peer"] == p and r["resumed"]]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=p, s=18)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_xlabel("cut duration, s")
        ax.set_ylabel("restore -> data flows, s")
        ax.set_title("B3 resume time against cut duration")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(img / "b3_resume.png", dpi=100)
        plt.close(fig)
        page.add("![B3 resume time](img/b3_resume.png)", "")


# -- B4 -----------------------------------------------------------------------------------


def b4(page: Page, b: dict[str, Any], img: Path | None) -> None:
    runs = b["runs"]
    cfg = b["config"]
    page.add(
        "## B4 scale on one server",
        "",
        "Sessions from one load-generator process (uvloop) through one client-side process to "
        "one server-side process and an echo or sink backend, on loopback. Reference: "
        f"`pyrelay` = {cfg['peers']['pyrelay']}.",
        "",
        meta_line(b),
        "",
    )
    skipped_lines(page, b)
    idle = [r for r in runs if r["phase"] == "idle"]
    if idle:
        page.add(
            f"### Idle: {cfg['idle_sessions']} sessions, CPU over {cfg['idle_seconds']:g} s",
            "",
            "KiB per session is the slope of a least-squares line through RSS after each of "
            "ten opening steps; *delta* is (RSS at the end - RSS before) / sessions.",
            "",
        )
        rows = [
            [
                label(r["peer"]),
                str(r["sessions"]),
                fmt(r["server_kib_per_session"]),
                fmt(r["server_kib_per_session_delta"]),
                fmt(r["client_kib_per_session"]),
                f"{r['server_rss_kib'] / 1024:.0f}",
                fmt(r["server_cpu_pct"]),
                fmt(r["client_cpu_pct"]),
                fmt(r["probe_all_s"], 3),
            ]
            for r in idle
        ]
        page.table(
            ["peer", "sessions", "server KiB/session", "delta", "client KiB/session",
             "server RSS MiB", "server CPU % of a core", "client CPU %",
             "probe all sessions, s"],
            rows,
        )  # fmt: skip
        for r in idle:
            if r["peer"] == "tether":
                kib = r["server_kib_per_session"]
                page.target(
                    f"B4: server RSS <= {TARGET_B4_KIB} KiB per idle session ({r['sessions']} "
                    "sessions; issue 12; issue 4: 8 KiB)",
                    f"{kib:.2f} KiB (delta {r['server_kib_per_session_delta']:.2f})",
                    kib <= TARGET_B4_KIB,
                    f"{1 - kib / TARGET_B4_KIB:+.0%} headroom",
                )
                wanted = r.get("sessions_wanted", r["sessions"])
                scale = wanted / r["sessions"]  # the descriptor limit may hold fewer
                server = r.get("server_cpu_pct_scaled", r["server_cpu_pct"])
                client = r["client_cpu_pct"] * scale
                page.target(
                    f"B4: idle CPU < {TARGET_B4_CPU_PCT:g}% of a core in each process, server "
                    f"and client ({wanted} sessions)",
                    f"server {server:.2f}%, client {client:.2f}%"
                    + (f" (scaled from {r['sessions']})" if wanted != r["sessions"] else ""),
                    max(server, client) < TARGET_B4_CPU_PCT,
                    f"{TARGET_B4_CPU_PCT - max(server, client):+.2f} points",
                )
        if img is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4.5))
            for r in idle:
                xs = [c[0] for c in r["rss_curve_kib"]]
                ax.plot(xs, [c[1] / 1024 for c in r["rss_curve_kib"]], "o-",
                        label=f"{r['peer']} server")  # fmt: skip
                ax.plot(xs, [c[2] / 1024 for c in r["rss_curve_kib"]], "x--",
                        label=f"{r['peer']} client side")  # fmt: skip
            ax.set_xlabel("idle sessions")
            ax.set_ylabel("RSS, MiB")
            ax.set_title("B4 resident memory against idle sessions")
            ax.legend(fontsize=8)
            ax.grid(True, alpha=0.3)
            fig.tight_layout()
            fig.savefig(img / "b4_rss.png", dpi=100)
            plt.close(fig)
            page.add("![B4 RSS](img/b4_rss.png)", "")
    active = [r for r in runs if r["phase"] == "active"]
    if active:
        n = active[0]["sessions"]
        page.add(
            f"### Aggregate throughput, {n} active sessions",
            "",
            f"Each session sends {cfg['active_bytes'] / n / 2**20:.2f} MiB to a sink at once; "
            "GB/s of payload over all sessions. One load-generator process drives all "
            "sessions, so `direct` is the ceiling of the harness itself.",
            "",
        )
        rows = []
        for p in dict.fromkeys(r["peer"] for r in active):
            med, lo, hi = smm([r["gbps"] for r in active if r["peer"] == p])
            rr = ratios(active, "gbps", "tether", p, "repeat") if p != "tether" else []
            rows.append([label(p), med, lo, hi, ratio_text(rr)])
        page.table(["peer", "median GB/s", "min", "max", "tether / peer"], rows)
    storm = [r for r in runs if r["phase"] == "storm"]
    if storm:
        n = storm[0]["sessions"]
        page.add(
            f"### Reconnect storm, {n} sessions",
            "",
            "Every session streams a numbered 64-byte message each 0.5 s through an echo "
            "backend; `ss -K` destroys every client<->server socket at once (both ends); a "
            "probe goes down every session right after; *all resumed* is the time from the "
            "kill until the last probe's echo. Then every byte sent must come back once, in "
            "order.",
            "",
        )
        rows = [
            [str(r["trial"]), str(r["sockets_killed"]), fmt(r["all_resumed_s"], 3),
             str(r["bytes_sent"]), str(r["bytes_echoed"]), str(r["bytes_bad"]),
             str(r["connections_lost"]), "yes" if r["zero_loss"] else "NO"]
            for r in storm
        ]  # fmt: skip
        page.table(
            ["trial", "sockets killed", "all resumed, s", "bytes sent", "bytes echoed",
             "bytes wrong", "app connections lost", "zero loss"],
            rows,
        )  # fmt: skip
    # A trial that failed (a session lost, the load generator's error) ends the phase with a
    # note and no row: it is judged with the trials that completed, never left out.
    failed = [
        note.removeprefix("storm: ") for note in b.get("notes", []) if note.startswith("storm:")
    ]
    if storm or failed:
        n = storm[0]["sessions"] if storm else cfg["storm_sessions"]
        worst = max((r["all_resumed_s"] for r in storm), default=math.inf)
        lossless = all(r["zero_loss"] for r in storm)
        page.target(
            f"B4: {n}-session storm fully resumed within 5 s, zero bytes lost",
            (f"worst {worst:.3f} s over {len(storm)} trials; " if storm else "")
            + ("zero loss" if lossless else "LOSS")
            + (f"; then a trial failed: {failed[0]}" if failed else ""),
            worst <= 5.0 and lossless and not failed,
            f"{5.0 - worst:+.2f} s" if storm else "-",
        )


# -- B5 -----------------------------------------------------------------------------------


def b5(page: Page, b: dict[str, Any], img: Path | None) -> None:
    runs = b["runs"]
    cfg = b["config"]
    page.add(
        "## B5 wire overhead",
        "",
        "*application*: bytes tether writes on the client<->server link, counted by a relay "
        "between them (frames, acknowledgements, handshake; no TCP/IP headers). *ip*: every "
        "packet on the veth between two namespaces, counted by nft (IP and TCP headers and "
        "bare ACKs included; plain TCP pays most of that too). Overhead = (link bytes both "
        "ways - payload) / payload.",
        "",
        meta_line(b),
        "",
    )
    skipped_lines(page, b)
    bulk = [r for r in runs if r["kind"] == "bulk"]
    if bulk:
        rows = []
        for r in bulk:
            payload = r.get("payload") or r["payload_up"] + r["payload_down"]
            c2s = r.get("link_c2s", r.get("client_to_server_bytes"))
            s2c = r.get("link_s2c", r.get("server_to_client_bytes"))
            rows.append(
                [r["level"], r.get("peer", "tether"), r["case"], str(payload), str(c2s),
                 str(s2c), f"{100 * r['overhead_ratio']:.4f}%"]
            )  # fmt: skip
        page.add(
            f"### Bulk, {cfg['bulk_bytes'] / 2**20:g} MiB each way",
            "",
            "At IP level nft counts GSO segments (up to 64 KiB each), not 1500-byte wire "
            "packets; compare tether with plain TCP on the same path.",
            "",
        )
        page.table(
            ["level", "peer", "direction", "payload bytes", "client->server",
             "server->client", "overhead"],
            rows,
        )  # fmt: skip
        app = [r["overhead_ratio"] for r in bulk if r["level"] == "application"]
        if app:
            worst = max(app)
            page.target(
                "B5: framing + acknowledgement overhead < 0.5% in bulk",
                f"{100 * worst:.4f}% (worst direction, application level)",
                worst < 0.005,
                f"{(0.005 - worst) / 0.005:+.0%} headroom",
            )
    ka = [r for r in runs if r["kind"] == "keepalive"]
    if ka:
        page.add(
            f"### Keepalive, {cfg['keepalive_sessions']} idle sessions for "
            f"{cfg['keepalive_seconds']:g} s",
            "",
        )
        page.table(
            ["level", "bytes per session per minute", "packets per session per minute"],
            [
                [r["level"], fmt(r["bytes_per_session_minute"], 0),
                 fmt(r.get("packets_per_session_minute"), 1)]
                for r in ka
            ],
        )  # fmt: skip


# -- B6 -----------------------------------------------------------------------------------

B6_BEGIN = "<!-- section: B6, `python -m benchmarks report --only B6 --out DIR` -->"
B6_END = "<!-- end of section: B6 -->"
PATHS = {
    "direct": "tether client -> tether server",
    "gateway": "tether client -> `tether gateway` -> tether server",
    "haproxy": "tether client -> HAProxy (deploy/haproxy/haproxy.cfg) -> tether server",
}


def _per_repeat(runs: list[dict[str, Any]], key: str) -> dict[int, dict[str, float]]:
    by: dict[int, dict[str, float]] = {}
    for r in runs:
        by.setdefault(r["repeat"], {})[r["path"]] = r[key]
    return by


def b6_paths(page: Page, runs: list[dict[str, Any]], cfg: dict[str, Any]) -> None:
    page.add(
        f"### One session through each path, TLS 1.3, {cfg['repeats']} repeat"
        + ("s" if cfg["repeats"] != 1 else ""),
        "",
        f"Bulk: {cfg['bytes'] / 2**20:g} MiB from the backend to the application per run, "
        f"MiB/s. Round trips: {cfg['count']} of 64 bytes per run, one at a time (after 200 "
        "warm-up), microseconds. *Added* is the path's figure minus direct's in the same "
        "repeat. The paths of one repeat ran back to back; each ratio is taken per repeat, "
        "then the median (min-max) over repeats.",
        "",
    )
    paths = list(dict.fromkeys(r["path"] for r in runs))
    added = {q: _per_repeat(runs, q) for q in ("p50_us", "p99_us")}
    rows = []
    for p in paths:
        row = [PATHS.get(p, p), *smm([r["mib_s"] for r in runs if r["path"] == p], 0)]
        for q in ("p50_us", "p99_us"):
            row += list(smm([r[q] for r in runs if r["path"] == p], 1))
            plus = [v[p] - v["direct"] for v in added[q].values() if p in v and "direct" in v]
            row.append(fmt(percentile(plus, 50), 1) if p != "direct" and plus else "")
        rows.append(row)
    page.table(
        ["path", "bulk MiB/s median", "min", "max", "p50 median", "min", "max", "added p50",
         "p99 median", "min", "max", "added p99"],
        rows,
    )  # fmt: skip
    loads = [r["loadavg"] for r in runs if "loadavg" in r]
    if loads:
        page.add(
            f"The 1-minute load average before each run was {fmt(min(loads))}-"
            f"{fmt(max(loads))} (median {fmt(percentile(loads, 50))}).",
            "",
        )
    if "gateway" not in paths or "haproxy" not in paths:
        return
    mib = _per_repeat(runs, "mib_s")
    both = [v for v in mib.values() if {"gateway", "haproxy", "direct"} <= set(v)]
    rows = [
        [name, ratio_text(rr), str(len(rr))]
        for name, rr in (
            ("bulk throughput", [v["gateway"] / v["haproxy"] for v in both]),
            ("bulk throughput, gateway / direct", [v["gateway"] / v["direct"] for v in both]),
            ("bulk throughput, HAProxy / direct", [v["haproxy"] / v["direct"] for v in both]),
        )
    ]
    for q in ("p50_us", "p99_us"):
        # Only the repeats where HAProxy added something: a ratio to zero or less means nothing.
        rr = [
            (v["gateway"] - v["direct"]) / (v["haproxy"] - v["direct"])
            for v in added[q].values()
            if {"gateway", "haproxy", "direct"} <= set(v) and v["haproxy"] > v["direct"]
        ]
        rows.append([f"added latency {q[:3]}", ratio_text(rr), str(len(rr))])
    page.add(
        "Gateway against HAProxy in the same place (gateway / HAProxy unless named), and the "
        "repeats each ratio could be taken from:",
        "",
    )
    page.table(["figure", "per repeat: median (min-max)", "repeats"], rows)


def b6_idle(page: Page, b: dict[str, Any]) -> None:
    cfg = b["config"]
    page.add(
        "### Idle sessions through one gateway",
        "",
        "One load generator opens sessions through one tether client and one `tether gateway` "
        f"to {cfg['idle_servers']} tether servers (leastconn: half each) and an echo backend, "
        "in steps; after each step (and before the first) the processes settle for "
        f"{cfg.get('settle_seconds', 3):g} s, then RSS is read and CPU (user + system) is "
        f"measured over {cfg['idle_seconds']:g} s with the default keepalive (a PING every 3 s per "
        f"session); then {cfg['idle_rtt_count']} round trips of 64 bytes straight to the echo "
        "backend and as many through the chain on one more session, while the others sit "
        "idle; *added* is the second's minus the first's. Both are timed in the load "
        "generator's event loop, so compare them with each other, not with the one-session "
        "figures above. *servers* sums both servers. "
        "KiB per session is the least-squares slope of RSS against sessions over the rows. "
        "*Other work* is the CPU the whole machine spent during the CPU window beyond the "
        "tether processes (the load generator, the backend, and other jobs on this shared "
        "machine), in cores of its 2; *load average* is the 1-minute figure after it.",
        "",
    )
    for part, title in (
        ("idle-tls", "TLS 1.3 on both hops (as deployed)"),
        ("idle-plaintext", "clear text on both hops (`--plaintext`, `--server-plaintext`)"),
    ):
        rows = [r for r in b["runs"] if r.get("part") == part]
        if not rows:
            continue
        ex = b.get("extra", {}).get(part, {})
        page.add(f"#### {title}", "")
        page.table(
            ["idle sessions", "gateway RSS MiB", "gateway CPU % of a core", "servers RSS MiB",
             "servers CPU %", "client RSS MiB", "client CPU %", "other work, cores",
             "load average"],
            [
                [str(r["sessions"]), fmt(r["gateway_rss_kib"] / 1024, 0),
                 fmt(r["gateway_cpu_pct"], 1), fmt(r["server_rss_kib"] / 1024, 0),
                 fmt(r["server_cpu_pct"], 1), fmt(r["client_rss_kib"] / 1024, 0),
                 fmt(r["client_cpu_pct"], 1), fmt(r.get("others_cores"), 2),
                 fmt(r.get("loadavg"), 2)]
                for r in rows
            ],
        )  # fmt: skip
        page.table(
            ["idle sessions", "round trip p50 us", "p99 us", "direct to the backend p50",
             "p99", "added p50", "added p99"],
            [
                [str(r["sessions"]), fmt(r["rtt_p50_us"], 0), fmt(r["rtt_p99_us"], 0),
                 fmt(r.get("direct_p50_us"), 0), fmt(r.get("direct_p99_us"), 0),
                 fmt(r["rtt_p50_us"] - r["direct_p50_us"], 0) if "direct_p50_us" in r else "-",
                 fmt(r["rtt_p99_us"] - r["direct_p99_us"], 0) if "direct_p99_us" in r else "-"]
                for r in rows
            ],
        )  # fmt: skip
        if ex:
            page.add(
                f"Per idle session: gateway {fmt(ex['gateway_kib_per_session'])} KiB (delta "
                f"{fmt(ex['gateway_kib_per_session_delta'])}), servers "
                f"{fmt(ex['server_kib_per_session'])} KiB, client "
                f"{fmt(ex['client_kib_per_session'])} KiB. A probe through all "
                f"{ex['sessions']} sessions at the end: {fmt(ex['probe_all_s'], 3)} s.",
                "",
            )


def b6(page: Page, b: dict[str, Any], img: Path | None) -> None:
    cfg = b["config"]
    page.add(
        B6_BEGIN,
        "",
        "## B6 a gateway in front",
        "",
        "What `tether gateway` costs in front of tether servers, against HAProxy "
        f"{cfg.get('haproxy', '(not installed)')} with the shipped deploy/haproxy/haproxy.cfg "
        "in the same place (it ends the client's TLS and speaks TLS to the server, as the "
        "gateway does), and how many idle sessions one gateway carries. Loopback; every "
        "process shares the machine's cores. See benchmarks/gateway.py.",
        "",
        meta_line(b),
        "",
    )
    skipped_lines(page, b)
    runs = [r for r in b["runs"] if r.get("part") == "path"]
    if runs:
        b6_paths(page, runs, cfg)
    b6_idle(page, b)
    page.add(B6_END, "")


# -- profile ------------------------------------------------------------------------------


def profile_section(page: Page, prof: dict[str, Any]) -> None:
    page.add(
        f"## Profile: {prof.get('workload', 'bulk')} through tether",
        "",
        f"Made with `{prof.get('command', '?')}` at {prof.get('time', '?')}, "
        + (
            f"commit {prof['commit']} (src/ at {prof.get('src_commit', '?')}"
            + (", src/ modified" if prof.get("dirty_src") else "")
            + ")"
            if prof.get("commit")
            else "commit not recorded (this profile predates profile.py recording it)"
        )
        + ": "
        f"{prof.get('description', '')}",
        "",
    )
    chains = prof.get("chains", {})
    if chains:
        unit = "GiB" if prof.get("workload", "bulk") == "bulk" else "million round trips"
        if prof.get("workload") == "idle":
            unit = "run"
        page.table(
            ["chain", "processes", f"CPU seconds per {unit}, all chain processes"],
            [[k, str(v["processes"]), fmt(v["cpu_s_per_unit"], 3)] for k, v in chains.items()],
        )
    for role, data in prof.get("roles", {}).items():
        busy = data.get("samples", 0) - data.get("idle_samples", 0)
        page.add(
            f"### {role}: {busy} busy of {data.get('samples', 0)} samples, "
            f"{fmt(data.get('cpu_pct'), 0)}% of a core, "
            f"{fmt(data.get('cpu_s_per_unit'), 3)} CPU s and "
            f"{fmt(data.get('minflt_per_unit'), 0)} minor page faults per {data.get('unit')}",
            "",
            "Shares are of the busy samples (the innermost frame is not epoll).",
            "",
        )
        page.table(
            ["self %", "function (file:line)"],
            [[fmt(p, 1), f"`{f}`"] for f, p in data.get("self", [])[:12]],
        )
        page.table(
            ["total %", "function (file:line), inclusive"],
            [[fmt(p, 1), f"`{f}`"] for f, p in data.get("total", [])[:12]],
        )


def write_docs(results: Path, docs: Path, plots: bool = True) -> Path:
    data = json.loads(results.read_text())
    benches = data.get("benchmarks", {})
    img = docs / "img"
    if plots:
        img.mkdir(parents=True, exist_ok=True)
    page = Page()
    body = Page()
    render = {"B1": b1, "B2": b2, "B3": b3, "B4": b4, "B5": b5, "B6": b6}
    for bid in sorted(benches):
        if bid in render:
            render[bid](body, benches[bid], img if plots else None)
            page.targets.extend(body.targets)
            body.targets = []
    meta = data.get("meta", {})
    page.add(
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks` (see `benchmarks/__main__.py`; `python -m "
        "benchmarks report` rewrites this page from `results/latest.json`). Do not edit by "
        "hand: the analysis at the end comes from `benchmarks/analysis.md`.",
        "",
        f"Machine: {meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, shared and noisy "
        f"(other work runs beside the benchmarks); Linux {meta.get('kernel', '?')}, Python "
        f"{meta.get('python', '?')}, uvloop {meta.get('uvloop', '?')}. Every process of a run "
        "(application, relays, backend) shares the two cores, so a two-hop chain runs four "
        "busy processes on two cores.",
        "",
        "Peers: " + "; ".join(f"`{k}` = {v.describe()}" for k, v in PEERS.items()) + ".",
        "",
        "## Targets (issues 4 and 12; with TLS in its section below)",
        "",
        "Ratios are taken within each repeat (its peers ran back to back) and their median "
        "over repeats is judged; the thresholds are in `benchmarks/targets.py`.",
        "",
    )
    if page.targets:
        page.table(["target", "measured", "verdict", "margin"],
                   [list(t) for t in page.targets])  # fmt: skip
    page.lines.extend(body.lines)
    if has_tls_runs(benches):
        page.add(TLS_BEGIN, "")
        tls_section(page, benches, img if plots else None)
        page.add(TLS_END, "")
    for prof_path in (
        results.parent / "profile.json",
        results.parent / "profile-rtt.json",
        results.parent / "profile-idle.json",
    ):
        if prof_path.exists():
            profile_section(page, json.loads(prof_path.read_text()))
    if ANALYSIS.exists():
        page.add(ANALYSIS.read_text().rstrip(), "")
    docs.mkdir(parents=True, exist_ok=True)
    out = docs / "benchmarks.md"
    out.write_text("\n".join(page.lines).rstrip() + "\n")
    return out


# -- TLS (issue 8) ------------------------------------------------------------------------

TLS_BEGIN = "<!-- section: tls, `python -m benchmarks report --tls --out DIR` -->"
TLS_END = "<!-- end of section: tls -->"
PROFILE_MARKER = "\n## Profile: "  # the profile sections follow the TLS section


def has_tls_runs(benches: dict[str, Any]) -> bool:
    return any(
        r.get("peer") in ("tether-tls", "stunnel2")
        for bid in ("B1", "B2", "B3")
        for r in benches.get(bid, {}).get("runs", [])
    )


def tls_section(page: Page, benches: dict[str, Any], img: Path | None) -> None:
    """ "With TLS (issue 8)": tether-tls against stunnel2, and tether (clear text) against
    socat -b 262144 from the same interleaved run, each peer's ratio to its reference
    (``targets.REFERENCE``), and TLS's targets (issues 8 and 12; clear text's are the top
    table's)."""
    page.add(
        "## With TLS (issue 8)",
        "",
        "`tether-tls`: tether client + server with their default TLS 1.3 links, the client "
        "trusting the server on first use (a scratch `XDG_CONFIG_HOME`; the server makes its "
        "identity in a scratch `XDG_STATE_HOME`). `stunnel2`: a client-mode stunnel in front "
        "of a server-mode stunnel (two hops, like `socat2`), `sslVersionMin = TLSv1.3`, a "
        "self-signed EC P-256 certificate made per run that the client side verifies "
        "(`verifyPeer`). Both negotiate TLS_AES_256_GCM_SHA384 (OpenSSL 3.0's first choice). "
        "`tether` and the socat peers are clear text (`--plaintext` on both tether ends). "
        "Ratios are per repeat (the peers of one repeat ran back to back), then the median "
        "(min-max) over repeats; B2's *added* is the peer's latency minus direct TCP's in the "
        "same repeat.",
        "",
    )
    targets = Page()
    body = Page()
    b1 = benches.get("B1")
    if b1 and b1.get("runs"):
        runs, cfg = b1["runs"], b1["config"]
        body.add(
            f"### B1 bulk, {cfg['bytes'] / 2**30:g} GiB per run, {cfg['repeats']} repeats",
            "",
            meta_line(b1),
            "",
        )
        skipped_lines(page, b1)
        peers = list(dict.fromkeys(r["peer"] for r in runs))
        for case in cfg["cases"]:
            cr = [r for r in runs if r["case"] == case]
            rows = []
            for p in peers:
                med, lo, hi = smm([r["gbps"] for r in cr if r["peer"] == p])
                base = REFERENCE[p][0] if p in REFERENCE else ""  # TLS with TLS, clear with clear
                rr = ratios(cr, "gbps", p, base, "repeat") if base else []
                rows.append([label(p), med, lo, hi, f"/ {base}: {ratio_text(rr)}" if rr else ""])
                if rr and p == "tether-tls":  # clear text's targets: the top table
                    m, want = percentile(rr, 50), TARGET_B1[base]
                    targets.target(
                        f"B1 {case}: {p} >= {want:.1f}x stunnel two hops",
                        f"{ratio_text(rr)} per repeat; medians "
                        f"{percentile([r['gbps'] for r in cr if r['peer'] == p], 50):.2f} vs "
                        f"{percentile([r['gbps'] for r in cr if r['peer'] == base], 50):.2f} GB/s",
                        m >= want,
                        f"{m / want - 1:+.0%} against {want:.1f}x",
                    )
            body.add(f"#### {case}", "")
            body.table(["peer", "median GB/s", "min", "max", "ratio to its baseline"], rows)
        if img is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(9, 4.5))
            width = 0.8 / max(1, len(peers))
            for i, p in enumerate(peers):
                meds, lo_err, hi_err = [], [], []
                for case in cfg["cases"]:
                    s = summary([r["gbps"] for r in runs if r["case"] == case and r["peer"] == p])
                    meds.append(s["median"])
                    lo_err.append(s["median"] - s["min"])
                    hi_err.append(s["max"] - s["median"])
                xs = [j + i * width for j in range(len(cfg["cases"]))]
                ax.bar(xs, meds, width, yerr=[lo_err, hi_err], capsize=3, label=p)
            ax.set_xticks([j + width * (len(peers) - 1) / 2 for j in range(len(cfg["cases"]))])
            ax.set_xticklabels(cfg["cases"])
            ax.set_ylabel("GB/s (median, whiskers min-max)")
            ax.set_title(f"B1 with TLS and clear text, {cfg['bytes'] / 2**30:g} GiB per run")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(img / "tls_b1_throughput.png", dpi=100)
            plt.close(fig)
            body.add("![B1 with TLS](img/tls_b1_throughput.png)", "")
    b2 = benches.get("B2")
    if b2 and b2.get("runs"):
        runs, cfg = b2["runs"], b2["config"]
        body.add(
            f"### B2 64-byte round trips, {cfg['count']} per run, {cfg['repeats']} repeats",
            "",
            meta_line(b2),
            "",
        )
        skipped_lines(page, b2)
        peers = list(dict.fromkeys(r["peer"] for r in runs))
        added = added_latency(runs)
        rows = []
        for p in peers:
            row = [label(p)]
            for q in ("p50_us", "p99_us"):
                row += list(smm([r[q] for r in runs if r["peer"] == p], 1))
                mine = added.get(p, {}).get(q, {})
                row.append(fmt(percentile(list(mine.values()), 50), 1) if mine else "-")
            base = REFERENCE[p][1] if p in REFERENCE else None
            cells = []
            for q in ("p50_us", "p99_us"):
                mine = added.get(p, {}).get(q, {})
                theirs = added.get(base or "", {}).get(q, {})
                rr = added_ratios(added, p, base or "", q)
                cells.append(ratio_text(rr))
                if rr and p == "tether-tls":  # clear text's targets: the top table
                    m = percentile(rr, 50)
                    am, bm = (
                        percentile(list(mine.values()), 50),
                        percentile(list(theirs.values()), 50),
                    )
                    targets.target(
                        f"B2 {q[:3]}: {p} added latency <= {TARGET_B2}x {base}'s",
                        f"+{am:.1f} vs +{bm:.1f} us; per-repeat ratio {m:.2f}x "
                        f"({fmt(min(rr))}-{fmt(max(rr))})",
                        m <= TARGET_B2,
                        f"{1 - m / TARGET_B2:+.0%} headroom",
                    )
            row.append(f"/ {base}: {cells[0]}; {cells[1]}" if base and any(cells) else "")
            rows.append(row)
        body.table(
            ["peer", "p50 median", "min", "max", "added p50", "p99 median", "min", "max",
             "added p99", "added p50; p99 to its baseline's"],
            rows,
        )  # fmt: skip
    b3 = benches.get("B3")
    pct = (b3 or {}).get("extra", {}).get("percentiles", {})
    if b3 and pct:
        cfg = b3["config"]
        body.add(
            "### B3 resume after an outage",
            "",
            f"As in B3 above: namespaces, {cfg['method']}; cuts over "
            f"{min(cfg['cut_seconds']):g}-{max(cfg['cut_seconds']):g} s; {cfg['tether_settings']}.",
            "",
            meta_line(b3),
            "",
        )
        skipped_lines(page, b3)
        body.table(
            ["peer", "trials", "not resumed", "p50 s", "p99 s", "max s"],
            [
                [label(p), str(v["n"]), str(v["failed"]), fmt(v["p50_s"], 3),
                 fmt(v["p99_s"], 3), fmt(v["max_s"], 3)]
                for p, v in pct.items()
            ],
        )  # fmt: skip
        for p in ("tether-tls",):  # clear text's: the top table
            if p in pct:
                v = pct[p]
                targets.target(
                    f"B3: {p} p99 resume < 1 s after restore",
                    f"p99 {v['p99_s']:.3f} s, p50 {v['p50_s']:.3f} s over {v['n']} trials "
                    f"({v['failed']} not resumed)",
                    v["p99_s"] < 1.0 and v["failed"] == 0,
                    f"{1.0 - v['p99_s']:+.3f} s",
                )
    if targets.targets:
        page.add("### Targets with TLS (issues 8 and 12; clear text's in the table at the top)", "")
        page.table(["target", "measured", "verdict", "margin"], [list(t) for t in targets.targets])
    page.lines.extend(body.lines)


def _splice(docs: Path, begin: str, end: str, lines: list[str], before: tuple[str, ...]) -> Path:
    """Put ``lines`` (a section between the markers ``begin`` and ``end``) into
    docs/benchmarks.md in place of the previous one, else before the first of the ``before``
    markers found, else at the end; then the analysis again at the end. Every other
    section keeps its figures and its "Made with" line."""
    out = docs / "benchmarks.md"
    text = out.read_text()
    if begin in text:
        head, _, rest = text.partition(begin)
        text = head.rstrip() + "\n\n" + rest.partition(end)[2].lstrip()
    text = text.partition("\n## Analysis\n")[0].rstrip() + "\n"
    block = "\n".join(lines).rstrip() + "\n\n"
    for marker in before:
        if marker in text:
            head, _, tail = text.partition(marker)
            text = head.rstrip() + "\n\n" + block + marker.lstrip("\n") + tail
            break
    else:
        text = text.rstrip() + "\n\n" + block
    if ANALYSIS.exists():
        text = text.rstrip() + "\n\n" + ANALYSIS.read_text().rstrip() + "\n"
    out.write_text(text)
    return out


def splice_tls(results: Path, docs: Path, plots: bool = True) -> Path:
    """The TLS section rendered from ``results`` in place of the previous one (before the
    profiles), every other section as it is (:func:`_splice`)."""
    data = json.loads(results.read_text())
    img = docs / "img"
    if plots:
        img.mkdir(parents=True, exist_ok=True)
    section = Page()
    tls_section(section, data.get("benchmarks", {}), img if plots else None)
    return _splice(docs, TLS_BEGIN, TLS_END, [TLS_BEGIN, "", *section.lines, TLS_END],
                   (PROFILE_MARKER,))  # fmt: skip


def splice_b6(results: Path, docs: Path) -> Path:
    """The B6 section rendered from ``results`` in place of the previous one (or after B5,
    before the TLS section and the profiles), every other section as it is."""
    data = json.loads(results.read_text())
    b = data.get("benchmarks", {}).get("B6")
    if b is None:
        raise SystemExit(f"{results} holds no B6 results")
    section = Page()
    b6(section, b, None)  # its lines begin with B6_BEGIN and end with B6_END
    return _splice(docs, B6_BEGIN, B6_END, section.lines, (TLS_BEGIN, PROFILE_MARKER))
