"""``python -m benchmarks``: run the suite, write JSON under results/, regenerate the docs.

Examples::

    python -m benchmarks                      # everything, full size (about 40-50 min here)
    python -m benchmarks --quick              # everything, smaller
    python -m benchmarks --only B1,B2 --peers direct,socat2,tether
    python -m benchmarks --smoke --only B1,B2 --out /tmp/x --no-docs   # the test's run
    python -m benchmarks --only B6 --repeats 3 --no-docs   # a gateway against HAProxy, scale
    python -m benchmarks report --only B6     # only the B6 section of docs/benchmarks.md
    TBENCH_BASE_SRC=/other/checkout/src python -m benchmarks --quick --only B4 \
        --b4-phases idle --b4-peers tether-base,tether --b4-rounds 3 --no-docs  # idle A/B
    python -m benchmarks report               # docs/benchmarks.md from results/latest.json
    python -m benchmarks report --tls --out results/issue8   # only its "With TLS" section
    python -m benchmarks profile              # py-spy of the bulk data path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import SCALES, Result, machine_meta
from benchmarks.peers import DEFAULT_PEERS, PEERS
from benchmarks.procs import REPO, raise_nofile

ALL = ["B1", "B2", "B3", "B4", "B5", "B6"]


def run_suite(args: argparse.Namespace) -> int:
    scale = SCALES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.repeats:
        from dataclasses import replace

        scale = replace(scale, repeats=args.repeats)
    only = [b.strip().upper() for b in args.only.split(",")] if args.only else ALL
    peer_names = args.peers.split(",") if args.peers else DEFAULT_PEERS
    unknown = [p for p in peer_names if p not in PEERS]
    if unknown:
        print(f"unknown peers {unknown}; known: {sorted(PEERS)}", file=sys.stderr)
        return 2
    peers = [PEERS[p] for p in peer_names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = out / "logs" / stamp
    meta = machine_meta(["python", "-m", "benchmarks", *sys.argv[1:]])
    meta["scale"] = scale.name
    raise_nofile()

    results: list[Result] = []
    for bench in only:
        t0 = time.monotonic()
        print(f"== {bench} ({scale.name})", file=sys.stderr, flush=True)
        res = run_one(bench, scale, peers, logdir, args)
        res.meta = dict(meta, seconds=round(time.monotonic() - t0, 1))
        results.append(res)
        print(f"   {bench} done in {res.meta['seconds']}s", file=sys.stderr, flush=True)
        save(out, stamp, results, meta, keep=args.merge)
    if not args.no_docs:
        from benchmarks.report import write_docs

        write_docs(out / "latest.json", REPO / "docs")
    return 0


def run_one(bench: str, scale: Any, peers: list[Any], logdir: Path, args: Any) -> Result:
    if bench == "B1":
        from benchmarks.throughput import run_b1

        return run_b1(scale, peers, logdir, args.cases.split(","))
    if bench == "B2":
        from benchmarks.throughput import run_b2

        return run_b2(scale, peers, logdir)
    if bench == "B3":
        from benchmarks.resume import run_b3

        return run_b3(scale, peers, logdir)
    if bench == "B4":
        from benchmarks.scale import run_b4

        return run_b4(
            scale,
            logdir,
            args.b4_peers.split(","),
            tuple(args.b4_phases.split(",")),
            args.b4_rounds,
        )
    if bench == "B5":
        from benchmarks.overhead import run_b5

        return run_b5(scale, logdir)
    if bench == "B6":
        from benchmarks.gateway import run_b6

        return run_b6(scale, logdir, tuple(args.b6_parts.split(",")))
    raise SystemExit(f"unknown benchmark {bench}")


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the runs (and per-peer extras) of the peers that only ``old`` has."""
    fresh = {r.get("peer") for r in new["runs"]}
    merged = dict(new)
    merged["runs"] = [r for r in old.get("runs", []) if r.get("peer") not in fresh] + new["runs"]
    extra = {}
    for key in set(old.get("extra", {})) | set(new.get("extra", {})):
        a, b = old.get("extra", {}).get(key), new.get("extra", {}).get(key)
        extra[key] = {**a, **b} if isinstance(a, dict) and isinstance(b, dict) else b or a
    merged["extra"] = extra
    merged["skipped"] = {**old.get("skipped", {}), **new.get("skipped", {})}
    commands = [old.get("meta", {}).get("command"), new.get("meta", {}).get("command")]
    merged["meta"] = dict(new.get("meta", {}), merged_from=[c for c in commands if c])
    return merged


def save(
    out: Path, stamp: str, results: list[Result], meta: dict[str, Any], keep: bool = False
) -> None:
    """Write this run's file and put its benchmarks into results/latest.json.

    With ``keep`` (``--merge``), peers measured before and not in this run stay.
    """
    doc = {"meta": meta, "benchmarks": {r.id: r.to_json() for r in results}}
    (out / f"run-{stamp}.json").write_text(json.dumps(doc, indent=1))
    latest_path = out / "latest.json"
    latest: dict[str, Any] = {"benchmarks": {}}
    if latest_path.exists():
        with contextlib.suppress(ValueError):
            latest = json.loads(latest_path.read_text())
    for bid, bench in doc["benchmarks"].items():
        old = latest.setdefault("benchmarks", {}).get(bid)
        latest["benchmarks"][bid] = merge(old, bench) if keep and old else bench
    latest["meta"] = meta
    latest_path.write_text(json.dumps(latest, indent=1))


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds every ``with Procs``: children are stopped


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", nargs="?", default="run", choices=["run", "report", "profile"])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness only")
    parser.add_argument(
        "--only",
        help=f"comma-separated subset of {','.join(ALL)}; report --only B6: (re)write only "
        "B6's section of docs/benchmarks.md from --out, and the analysis after it",
    )
    parser.add_argument("--peers", help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--cases", default="up,down,both", help="B1 directions")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeat count")
    parser.add_argument(
        "--b4-peers", default="tether,pyrelay", help="B4: chains measured idle and active"
    )
    parser.add_argument("--b4-phases", default="idle,active,storm", help="B4: which phases run")
    parser.add_argument(
        "--b4-rounds", type=int, default=1, help="B4: idle runs per chain, interleaved"
    )
    parser.add_argument(
        "--b6-parts",
        default="path,idle-tls,idle-plaintext",
        help="B6: one session direct / through the gateway / through HAProxy (path), and idle "
        "sessions through one gateway with TLS or in clear text",
    )
    parser.add_argument("--out", default=str(REPO / "results"), help="results directory")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/")
    parser.add_argument(
        "--merge", action="store_true", help="keep earlier results of peers not in this run"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="report: (re)write only the 'With TLS' section of docs/benchmarks.md from --out, "
        "and the analysis after it; every other section is left as it is",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="profile: seconds sampled")
    parser.add_argument(
        "--workload", default="bulk", choices=["bulk", "rtt", "idle"], help="profile"
    )
    parser.add_argument("--sessions", type=int, default=10000, help="profile idle: sessions")
    args = parser.parse_args(argv)
    if args.what == "report":
        from benchmarks.report import splice_b6, splice_tls, write_docs

        if args.only and args.only.strip().upper() == "B6":
            splice_b6(Path(args.out) / "latest.json", REPO / "docs")
        elif args.tls:
            splice_tls(Path(args.out) / "latest.json", REPO / "docs")
        else:
            write_docs(Path(args.out) / "latest.json", REPO / "docs")
        return 0
    if args.what == "profile":
        from benchmarks.profile import run_profile

        return run_profile(args)
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
