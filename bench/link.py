"""A rate-limited TCP link between one benchmark process and the broker.

``python bench/link.py serve '{"port": P, "mbit": M, "upstream": "host:port"}'`` listens on
127.0.0.1:P and forwards each connection to the broker at ``upstream``, each direction of
each connection limited to M megabits per second (10**6 bits), as if every process sat
behind a link of its own. ``bench/run.py`` runs one in its own process for its "1 MB ...,
M Mbit/s link" workloads, so its CPU time is in neither the worker's figures nor the
caller's; a call through it crosses four links: caller to broker, broker to worker, and
the reply back.

Each direction is paced like a real link: bytes are read up to 5 ms of the rate at a time,
and each read is forwarded when a link of that rate would have finished sending it (a loop
timer), less up to 2 ms of credit that an idle link has saved: so a small frame on an idle
link (the handshake, a heartbeat, an ack) goes at once, a small frame behind a large body
waits for it, and a large body arrives at the rate, at most 2 ms early. The credit also
keeps a timer that fires late (epoll rounds up to the millisecond) from slowing the link
below its rate. Only bandwidth is modelled: no propagation delay, no loss.

Forwarding itself adds about 0.1 ms per link to every frame (a Python process in the
path). Its CPU time, on the 2-core machine of docs/BENCHMARKS.md at 100 Mbit/s: about 5 ms
per megabyte forwarded (a loop wake-up per read, the kernel's loopback copies), so about
20 ms per call of 1 MB of random bytes, which crosses four links; each link workload's
"link proxy CPU us/call" figure is what it spent. Not for anything but the benchmark:
loopback only, no limits on connections.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import common
from common import ready_until_signal

#: Seconds of the rate read at once: fewer, larger reads cost the proxy less CPU.
READ_S = 0.005
#: Seconds of the rate an idle link may send at once. More than the lateness of a loop
#: timer (epoll rounds its timeouts up to the millisecond), which it makes up for.
CREDIT_S = 0.002
#: Bounds of one read, so that slow links do not spin on tiny reads nor fast ones buffer much.
MIN_READ = 4096
MAX_READ = 512 * 1024
HOST = "127.0.0.1"


def upstream(url: str) -> str:
    """``host:port`` of the broker of an amqp:// URL."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}"


def via(url: str, port: int) -> str:
    """``url`` with the broker's address replaced by the link's on this host."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{HOST}:{port}" if user else
                                     f"{HOST}:{port}"))


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               rate: float) -> None:
    """Copy ``reader`` to ``writer`` at ``rate`` bytes per second until end of file."""
    loop = asyncio.get_running_loop()
    read_size = min(MAX_READ, max(MIN_READ, int(rate * READ_S)))
    sent_at = 0.0  # when a real link would have finished sending what was forwarded
    while data := await reader.read(read_size):
        now = loop.time()
        sent_at = max(sent_at, now - CREDIT_S) + len(data) / rate
        if sent_at > now:
            await asyncio.sleep(sent_at - now)
        writer.write(data)
        await writer.drain()


async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  broker: tuple[str, int], rate: float) -> None:
    """Forward one connection both ways until either side closes it."""
    try:
        up_reader, up_writer = await asyncio.open_connection(*broker, limit=MAX_READ)
    except OSError:
        writer.close()
        return
    pumps = [asyncio.create_task(pump(reader, up_writer, rate)),
             asyncio.create_task(pump(up_reader, writer, rate))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        pass  # the proxy stops; asyncio's server must not log it as an error
    finally:
        for task in pumps:
            task.cancel()
        # A reset connection ends its pump with an error: the end of the link, not a fault.
        await asyncio.gather(*pumps, return_exceptions=True)
        writer.close()
        up_writer.close()


async def serve(spec: dict[str, Any]) -> None:
    """Forward connections on ``spec["port"]`` until SIGTERM."""
    host, _, port = spec["upstream"].rpartition(":")
    broker, rate = (host, int(port)), spec["mbit"] * 1e6 / 8  # bytes per second
    server = await asyncio.start_server(lambda r, w: connect(r, w, broker, rate), HOST,
                                        spec["port"], limit=MAX_READ)
    async with server:
        await ready_until_signal()


if __name__ == "__main__":
    if sys.argv[1] != "serve":
        sys.exit("usage: python bench/link.py serve '<orders as JSON>'")
    asyncio.run(serve(common.orders()))
