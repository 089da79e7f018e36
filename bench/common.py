"""What every part of the benchmark shares: payloads, statistics, RSS, the child protocol.

Each system's worker and caller run as child processes of ``bench/run.py``. A child reads
its orders from its command line (a JSON object), prints ``READY`` once it serves (workers)
and ``RESULT <json>`` lines with its figures (callers); nothing else on stdout counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/, not the repository, first
    sys.path.insert(0, str(ROOT))

# crew's rows measure crew as it is without its optional extras (metrics and traces are on
# by default where prometheus_client or OpenTelemetry is installed, as in the test
# environment): bench/observing.py measures what they cost, with each set-up explicit.
os.environ.setdefault("CREW_METRICS", "0")
os.environ.setdefault("CREW_TRACES", "0")

#: The broker; the same vhost for every system.
URL = os.environ.get("BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: Calls in flight and the prefetch of raw and aio-pika workers (crew's follows concurrency).
PREFETCH = 64
SMALL_BYTES = 100
LARGE_BYTES = 1_000_000

READY = "READY"
RESULT = "RESULT "


# --- payloads ---------------------------------------------------------------------------

def link_workload(kind: str, mbit: float) -> str:
    """The name of the 1 MB ``kind`` ("random", "text") workload through a link of ``mbit``."""
    return f"1 MB {kind}, {mbit:g} Mbit/s link"


def random_bytes(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def compressible_text(size: int, seed: int = 7) -> str:
    """Words drawn at random from a 2000-word vocabulary: about 3:1 with zlib level 1."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocabulary = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(2000)]
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(vocabulary)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


# --- figures ----------------------------------------------------------------------------

def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; NaN without samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def rss_mib(pid: int) -> float:
    """Resident set size of a process in MiB (``VmRSS`` of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command name
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Recorder:
    """Collects ``(workload, figure, value)`` triples and prints them for the parent.

    ``worker_pid``: the worker process, whose CPU time :meth:`cpu` reads beside the
    caller's own; ``link_pid``: the rate-limited link (bench/link.py) both go through,
    if any, whose CPU time it reads too.
    """

    def __init__(self, worker_pid: int | None = None, link_pid: int | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.worker_pid = worker_pid
        self.link_pid = link_pid

    def cpu_mark(self) -> tuple[float, ...]:
        worker = cpu_seconds(self.worker_pid) if self.worker_pid else float("nan")
        link = cpu_seconds(self.link_pid) if self.link_pid else float("nan")
        return worker, cpu_seconds(os.getpid()), link

    def cpu(self, workload: str, mark: tuple[float, ...], calls: int) -> None:
        """CPU time per call of the worker, of the caller (and of the link) since ``mark``,
        in µs."""
        now = self.cpu_mark()
        self.add(workload, "worker CPU us/call", 1e6 * (now[0] - mark[0]) / calls)
        self.add(workload, "client CPU us/call", 1e6 * (now[1] - mark[1]) / calls)
        if self.link_pid:
            self.add(workload, "link proxy CPU us/call", 1e6 * (now[2] - mark[2]) / calls)

    def add(self, workload: str, figure: str, value: float) -> None:
        self.rows.append({"workload": workload, "figure": figure, "value": value})

    def latency(self, workload: str, started: float, samples: list[float]) -> None:
        """calls/s over the whole workload, p50 and p99 of the per-call seconds (in ms)."""
        elapsed = time.perf_counter() - started
        self.add(workload, "calls/s", len(samples) / elapsed)
        self.add(workload, "p50 ms", 1000 * percentile(samples, 50))
        self.add(workload, "p99 ms", 1000 * percentile(samples, 99))

    def throughput(self, workload: str, started: float, calls: int) -> None:
        self.add(workload, "calls/s", calls / (time.perf_counter() - started))

    def emit(self) -> None:
        print(RESULT + json.dumps(self.rows), flush=True)


class Turns:
    """A caller's half of the sequential workload, which every system's caller runs in turns
    (``bench/run.py``, ``sequential_round``), so that each block of calls of one system runs
    on the same machine, at nearly the same moment, as the blocks of the others.

    Once warmed up the caller announces READY; :meth:`block` then reads how many calls to
    make (a line on stdin; ``end`` or EOF: no more) and returns that plus :attr:`WARM`, and
    :meth:`done` takes the per-call seconds of the block and tells ``run.py`` (``done``). The
    first :attr:`WARM` calls of each block are not counted: after an idle spell, while the
    others took their turns, they run on cold caches, which would penalise the systems with
    more code on the path. :attr:`rec` gets calls/s (from the counted calls' time), p50 and
    p99 over all the blocks, and CPU time per call from the first block to the last (between
    its turns the worker and the caller are idle).
    """

    WORKLOAD = "sequential 100 B"
    WARM = 5

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.samples: list[float] = []
        self._mark: tuple[float, ...] | None = None
        self._calls = 0
        announce_ready()

    def block(self) -> int | None:
        line = sys.stdin.readline().strip()
        if line in ("", "end"):
            return None
        if self._mark is None:
            self._mark = self.rec.cpu_mark()
        self._calls += int(line) + self.WARM
        return int(line) + self.WARM

    def done(self, samples: list[float]) -> None:
        self.samples += samples[self.WARM:]
        print("done", flush=True)

    def record(self) -> None:
        if not self.samples or self._mark is None:
            return
        self.rec.add(self.WORKLOAD, "calls/s", len(self.samples) / sum(self.samples))
        self.rec.add(self.WORKLOAD, "p50 ms", 1000 * percentile(self.samples, 50))
        self.rec.add(self.WORKLOAD, "p99 ms", 1000 * percentile(self.samples, 99))
        self.rec.cpu(self.WORKLOAD, self._mark, self._calls)


# --- child processes --------------------------------------------------------------------

def orders() -> dict[str, Any]:
    """The JSON object a child got as its last command-line argument."""
    return json.loads(sys.argv[-1])


def announce_ready() -> None:
    print(READY, flush=True)


async def ready_until_signal() -> None:
    """Announce readiness, then wait for SIGTERM or SIGINT (a server's main coroutine)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    announce_ready()
    await stop.wait()


def stop_on_sigterm(stop: Callable[[], None]) -> None:
    """Call ``stop`` (from the signal handler) on SIGTERM and SIGINT."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop())


def plan_calls(total: int, in_flight: int) -> list[int]:
    """How many calls each of ``in_flight`` concurrent loops makes, ``total`` in all."""
    share, extra = divmod(total, in_flight)
    return [share + (1 if i < extra else 0) for i in range(in_flight)]
