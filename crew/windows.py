"""Arithmetic on the cumulative figures workers publish (docs/PROTOCOL.md, section 13): a
map read into a checked form, what a worker counted between two of its messages, those
summed over workers, and percentiles of the summed histograms.

A figures map comes from anyone who may publish to the vhost: :func:`checked` keeps only
what has the documented shape (outcome counts and bucket counts as ints, histograms as
long as the buckets), so that the rest is plain arithmetic on lists. A dashboard does this
work once per worker's message (:func:`growth`), not once per view: a view only adds up
what each worker counted in the window.
"""

from __future__ import annotations

import collections
from typing import Any

from . import outcomes
from .validation import are_counts, is_count, is_number

__all__ = ["Figures", "Sum", "checked", "checked_buckets", "growth", "quantile"]

#: Task -> (count by outcome, run histogram, wait histogram); a histogram None when absent.
Figures = dict[str, tuple[dict[str, int], "list[int] | None", "list[int] | None"]]


def checked_buckets(raw: object) -> tuple[float, ...] | None:
    """The buckets' bounds of a map, if they are a list of increasing numbers."""
    if not isinstance(raw, list) or not raw:
        return None
    if not all(map(is_number, raw)) or sorted(raw) != raw:
        return None
    return tuple(raw)


def checked(raw: object, size: int, last_raw: dict[str, Any] | None = None,
            last: Figures | None = None) -> Figures:
    """The well-formed part of a map's ``figures``: histograms of ``size`` counts. An entry
    equal to the same worker's ``last_raw`` one (a task not called since its last message,
    most of them) is not checked again: ``last``'s is taken."""
    if not isinstance(raw, dict):
        return {}
    figures: Figures = {}
    for task, entry in raw.items():
        if last_raw is not None and last is not None and task in last and _same(
                last_raw.get(task), entry):
            figures[task] = last[task]
            continue
        if not isinstance(task, str) or not isinstance(entry, dict):
            continue
        counts = entry.get("outcomes")
        figures[task] = (
            {k: v for k, v in counts.items() if isinstance(k, str) and is_count(v)}
            if isinstance(counts, dict) else {},
            _histogram(entry.get("run"), size), _histogram(entry.get("wait"), size))
    return figures


def _same(last: object, entry: object) -> bool:
    """``last == entry``; False where comparing them exhausts the stack (msgpack nests 1000
    lists deep, far more than the stack holds under pika's callback)."""
    try:
        return last == entry
    except RecursionError:
        return False


def _histogram(raw: object, size: int) -> list[int] | None:
    if isinstance(raw, list) and len(raw) == size and are_counts(raw):
        return raw
    return None


def growth(base: Figures, newest: Figures) -> Figures:
    """What grew from ``base`` to ``newest`` (a worker's counts at two times), task by task;
    tasks that did not change are left out. A count that went down (it cannot: a worker
    counts from its start) counts as no growth."""
    grown: Figures = {}
    for task, now in newest.items():
        was = base.get(task)
        if was is now or was == now:
            continue
        old_counts, old_run, old_wait = was or ({}, None, None)
        counts, run, wait = now
        grown[task] = ({k: n - old_counts.get(k, 0) for k, n in counts.items()
                        if n > old_counts.get(k, 0)}, _minus(run, old_run), _minus(wait, old_wait))
    return grown


def _minus(new: list[int] | None, old: list[int] | None) -> list[int] | None:
    if new is None or old is None or len(old) != len(new):
        return new
    return [max(0, a - b) for a, b in zip(new, old, strict=True)]


class Sum:
    """One task's growth over the window, added up over workers."""

    __slots__ = ("buckets", "outcomes", "run", "wait", "seconds")

    def __init__(self) -> None:
        self.buckets: tuple[float, ...] | None = None
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.run: list[int] | None = None
        self.wait: list[int] | None = None
        self.seconds = 0.0

    def add(self, grown: tuple[dict[str, int], list[int] | None, list[int] | None],
            buckets: tuple[float, ...] | None) -> None:
        counts, run, wait = grown
        self.outcomes.update(counts)
        if buckets is None or (self.buckets is not None and buckets != self.buckets):
            return  # histograms of other bounds (another crew version) do not add up
        self.buckets = buckets
        self.run = _plus(self.run, run)
        self.wait = _plus(self.wait, wait)

    @property
    def ended(self) -> int:
        """Calls that ended (a requeued one did not: it runs again)."""
        return sum(n for outcome, n in self.outcomes.items() if outcome != outcomes.REQUEUED)

    def figures(self) -> dict[str, Any]:
        """Calls per second, percentiles and counts, as a view's task row has them."""
        bounds = list(self.buckets or ())
        return {"rate": round(self.ended / self.seconds, 3) if self.seconds else None,
                "p50": quantile(0.5, bounds, self.run), "p95": quantile(0.95, bounds, self.run),
                "wait_p50": quantile(0.5, bounds, self.wait),
                "wait_p95": quantile(0.95, bounds, self.wait),
                "errors": self.outcomes[outcomes.REMOTE_ERROR],
                "killed": self.outcomes[outcomes.KILLED],
                "expired": self.outcomes[outcomes.EXPIRED]}


def _plus(total: list[int] | None, more: list[int] | None) -> list[int] | None:
    if more is None:
        return total
    if total is None:
        return list(more)
    return [a + b for a, b in zip(total, more, strict=True)]


def quantile(q: float, bounds: list[float], counts: list[int] | None) -> float | None:
    """The ``q`` quantile of a histogram (``counts`` per bucket, the last past every bound),
    interpolated within its bucket as Prometheus' ``histogram_quantile`` does; None if
    empty. Past the last bound it is that bound."""
    total = sum(counts) if counts else 0
    if total <= 0 or not bounds or counts is None:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            low = 0.0 if i == 0 else float(bounds[i - 1])
            return round(low + (float(bounds[i]) - low) * (rank - seen) / count, 6)
        seen += count
    return float(bounds[-1])
