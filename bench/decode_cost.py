"""Micro-benchmark: what ``crew.codec.decode`` costs per body, for the benchmark's bodies
and a few larger structured ones (no broker).

    python3 bench/decode_cost.py                 # this checkout's crew
    python3 bench/decode_cost.py --crew DIR      # another checkout's (DIR holds crew/)

Each figure is the median of ``--rounds`` rounds, each the mean of enough decodes to take
about 50 ms, in microseconds per decode. Compare two checkouts in the same minute: the
machine is shared, and only runs seconds apart say anything.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent


def bodies() -> dict[str, tuple[bytes, str, str | None]]:
    """Name: (body, content type, content encoding), built with msgpack, json and gzip."""
    import gzip

    import msgpack

    sys.path.insert(0, str(BENCH))
    from common import LARGE_BYTES, SMALL_BYTES, compressible_text, random_bytes

    rng = random.Random(3)
    records = [{"id": i, "name": f"user{i}", "score": rng.random(), "tags": ["a", "bb"],
                "ok": True} for i in range(20_000)]
    small_map = {"user": "neo", "id": 1999, "ok": True, "tags": ["a", "b"], "pad": "x" * 50}
    text = compressible_text(LARGE_BYTES)
    mp, js = "application/msgpack", "application/json"
    return {
        "100 B bytes (seq)": (msgpack.packb(random_bytes(SMALL_BYTES)), mp, None),
        "100 B map": (msgpack.packb(small_map), mp, None),
        "100 B map, JSON": (json.dumps(small_map).encode(), js, None),
        "1 MB random bytes": (msgpack.packb(random_bytes(LARGE_BYTES)), mp, None),
        "1 MB text": (msgpack.packb(text), mp, None),
        "1 MB text, gzip": (gzip.compress(msgpack.packb(text), 1), mp, "gzip"),
        "1 MB text, JSON": (json.dumps(text).encode(), js, None),
        "1 MB records": (msgpack.packb(records), mp, None),
        "1.7 MB records, JSON": (json.dumps(records).encode(), js, None),
    }


def per_call(func: Callable[[], Any], rounds: int) -> float:
    """Median over ``rounds`` of the mean time of ``func()``, in microseconds."""
    start = time.perf_counter()
    func()
    once = max(time.perf_counter() - start, 1e-6)
    repeat = max(1, int(0.05 / once))
    results = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            func()
        results.append((time.perf_counter() - start) / repeat * 1e6)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crew", help="directory holding the crew package to measure")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.crew).resolve() if args.crew else BENCH.parent))
    from crew import codec

    for name, (body, content_type, encoding) in bodies().items():
        micros = per_call(lambda body=body, content_type=content_type, encoding=encoding:
                          codec.decode(body, content_type, encoding), args.rounds)
        print(f"{name:24s} {len(body):>9d} B  {micros:10.2f} us")


if __name__ == "__main__":
    main()
