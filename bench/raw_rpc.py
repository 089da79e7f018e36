"""The reference: the minimal pika RPC loop, ``BlockingConnection`` on both sides.

Worker: consume with prefetch 64, publish the body back to ``reply_to`` with the call's
``correlation_id``, ack. Caller: publish with ``reply_to`` and ``correlation_id`` to a
non-durable queue (transient messages, no confirms), wait in ``process_data_events``.
With ``"confirms"`` in its orders, both sides publish in confirm mode: the "raw + confirms"
row, which measures what publisher confirms would cost crew's calls and replies. With
``"crew_queue"``, the same loop carries what crew asks of the broker: the queue has crew's
arguments (``x-max-priority``, a dead-letter exchange; a quorum queue's with
``"queue_type"``), calls carry a priority, a per-message TTL and crew's three headers and
are published ``mandatory`` (and persistent, in bench/queue_types.py), replies carry a
status header: the "raw + crew's queue" row, the broker's share of crew's cost. With ``"url"``, both
connect there instead of ``$BENCH_URL`` (a rate-limited link, bench/link.py); with
``"link"``, the caller runs the 1 MB workloads of the link only.

``python bench/raw_rpc.py worker|caller|turns '<orders as JSON>'`` (``bench/run.py`` does it;
``turns``: the sequential workload, in turns with the other systems, see common.Turns).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any, Callable

import common  # noqa: F401  (puts the repository on sys.path)
import pika
from common import (LARGE_BYTES, PREFETCH, SMALL_BYTES, URL, Recorder, Turns,
                    announce_ready, compressible_text, link_workload, orders, random_bytes,
                    rss_mib)

from crew import protocol


def worker(spec: dict[str, Any]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(spec.get("url", URL)))
    channel = connection.channel()
    reply_headers = None
    if spec.get("crew_queue"):
        channel.exchange_declare(protocol.EXPIRED_EXCHANGE, "headers", durable=True)
        channel.queue_declare(spec["queue"], durable=True,
                              arguments=protocol.task_queue_arguments(
                                  protocol.DEFAULT_QUEUE_MAX_PRIORITY,
                                  spec.get("queue_type", protocol.CLASSIC)))
        reply_headers = {protocol.STATUS_HEADER: protocol.STATUS_OK}
    else:
        channel.queue_declare(spec["queue"], durable=False)
    channel.basic_qos(prefetch_count=PREFETCH)
    if spec.get("confirms"):  # the "raw + confirms" row: what publisher confirms cost
        channel.confirm_delivery()

    def on_request(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
        ch.basic_publish("", props.reply_to, body, pika.BasicProperties(
            correlation_id=props.correlation_id, headers=reply_headers))
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(spec["queue"], on_request)
    announce_ready()
    try:
        channel.start_consuming()
    except (KeyboardInterrupt, SystemExit):
        pass


class Caller:
    def __init__(self, queue: str, confirms: bool = False, crew_queue: bool = False,
                 url: str = URL, persistent: bool = False) -> None:
        self.queue = queue
        self.crew_queue = crew_queue
        self.delivery_mode = 2 if persistent else None
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        if confirms:  # each publish then waits for the broker's ack
            self.channel.confirm_delivery()
        result = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        self.reply_queue = result.method.queue
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        self.waiting: dict[str, Callable[[bytes], None]] = {}

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties,
                  body: bytes) -> None:
        on_reply = self.waiting.pop(props.correlation_id, None)
        if on_reply is not None:
            on_reply(body)

    def publish(self, body: bytes, on_reply: Callable[[bytes], None]) -> None:
        correlation_id = uuid.uuid4().hex
        self.waiting[correlation_id] = on_reply
        properties = pika.BasicProperties(reply_to=self.reply_queue,
                                          correlation_id=correlation_id,
                                          delivery_mode=self.delivery_mode)
        if self.crew_queue:  # what crew's client sends with every call
            deadline = protocol.now_ms() + 60_000
            properties.priority = 0
            properties.expiration = protocol.ttl_property(deadline)
            properties.headers = {protocol.DEADLINE_HEADER: deadline,
                                  protocol.TASK_HEADER: "echo",
                                  protocol.CLIENT_HEADER: self.reply_queue}
        self.channel.basic_publish("", self.queue, body, properties,
                                   mandatory=self.crew_queue)

    def call(self, body: bytes) -> bytes:
        replies: list[bytes] = []
        self.publish(body, replies.append)
        while not replies:
            self.connection.process_data_events(time_limit=None)
        return replies[0]

    def sequential(self, body: bytes, calls: int) -> list[float]:
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            self.call(body)
            samples.append(time.perf_counter() - started)
        return samples

    def in_flight(self, body: bytes, calls: int, in_flight: int) -> None:
        state = {"to_send": calls, "done": 0}

        def on_reply(_body: bytes) -> None:
            state["done"] += 1
            if state["to_send"]:
                state["to_send"] -= 1
                self.publish(body, on_reply)

        for _ in range(min(in_flight, calls)):
            state["to_send"] -= 1
            self.publish(body, on_reply)
        while state["done"] < calls:
            self.connection.process_data_events(time_limit=None)


def caller(spec: dict[str, Any]) -> None:
    rec = Recorder(spec["worker_pid"], spec.get("link", {}).get("pid"))
    rpc = Caller(spec["queue"], spec.get("confirms", False), spec.get("crew_queue", False),
                 spec.get("url", URL))
    small = random_bytes(SMALL_BYTES)
    warmup = spec["warmup"]
    if spec.get("link"):
        link_workloads(rpc, rec, spec["link"])
        rpc.connection.close()
        rec.emit()
        return
    if spec.get("memory"):
        memory(rpc, rec, spec["memory"], small)
        rec.emit()
        return
    rpc.in_flight(small, warmup, PREFETCH)
    rpc.sequential(small, warmup)
    mark, started = rec.cpu_mark(), time.perf_counter()
    rpc.in_flight(small, spec["inflight_calls"], PREFETCH)
    rec.throughput("64 in flight 100 B", started, spec["inflight_calls"])
    rec.cpu("64 in flight 100 B", mark, spec["inflight_calls"])
    for workload, body in (("1 MB random", random_bytes(LARGE_BYTES)),
                           ("1 MB text", compressible_text(LARGE_BYTES).encode())):
        rpc.sequential(body, max(1, warmup // 20))
        mark, started = rec.cpu_mark(), time.perf_counter()
        rpc.sequential(body, spec["large"])
        rec.throughput(workload, started, spec["large"])
        rec.cpu(workload, mark, spec["large"])
    rpc.connection.close()
    rec.emit()


def take_turns(spec: dict[str, Any]) -> None:
    """The sequential workload, in the turns ``bench/run.py`` gives (common.Turns)."""
    rec = Recorder(spec["worker_pid"])
    rpc = Caller(spec["queue"], spec.get("confirms", False), spec.get("crew_queue", False))
    small = random_bytes(SMALL_BYTES)
    rpc.in_flight(small, spec["warmup"], PREFETCH)
    rpc.sequential(small, spec["warmup"])
    turns = Turns(rec)
    while (calls := turns.block()) is not None:
        turns.done(rpc.sequential(small, calls))
    rpc.connection.close()
    turns.record()
    rec.emit()


def link_workloads(rpc: Caller, rec: Recorder, link: dict[str, Any]) -> None:
    """1 MB of random bytes, then of text, through the link: one call to warm up, then
    ``link["calls"]`` measured."""
    for kind, body in (("random", random_bytes(LARGE_BYTES)),
                       ("text", compressible_text(LARGE_BYTES).encode())):
        workload = link_workload(kind, link["mbit"])
        rpc.sequential(body, 1)
        mark, started = rec.cpu_mark(), time.perf_counter()
        rpc.sequential(body, link["calls"])
        rec.throughput(workload, started, link["calls"])
        rec.cpu(workload, mark, link["calls"])


def memory(rpc: Caller, rec: Recorder, spec: dict[str, Any], body: bytes) -> None:
    worker_pid = rec.worker_pid
    rpc.in_flight(body, spec["warmup"], PREFETCH)
    before = rss_mib(worker_pid), rss_mib(os.getpid())
    rpc.in_flight(body, spec["calls"], PREFETCH)
    after = rss_mib(worker_pid), rss_mib(os.getpid())
    record_memory(rec, spec["calls"], before, after)


def record_memory(rec: Recorder, calls: int, before: tuple[float, float],
                  after: tuple[float, float]) -> None:
    for side, start, end in (("worker", before[0], after[0]), ("client", before[1], after[1])):
        rec.add("memory", f"{side} MiB after warm-up", start)
        rec.add("memory", f"{side} MiB after {calls} calls", end)
        rec.add("memory", f"{side} growth %", 100 * (end - start) / start)


if __name__ == "__main__":
    {"worker": worker, "caller": caller, "turns": take_turns}[sys.argv[1]](orders())
