"""HTTP: ``POST /call/<task>`` through :mod:`crew.gateway` against the same handler answering
inline, under concurrent load.

Both servers are the gateway's own application (``crew.gateway.make_app``); the inline one
has its ``/call/<task>`` route taken over by a subclass of the gateway's handler that answers
the JSON body itself instead of calling the task, so the difference is crew's round trip.
The load comes from ``wrk`` when it is installed (``apt-get install wrk``), else from
:func:`load`, a keep-alive asyncio client in a process of its own (Tornado's own
``AsyncHTTPClient`` opens a connection per request, which would measure TCP set-up).

``bench/run.py`` (``http_round``) keeps every server up for the whole round and loads them
in one-second bursts of :func:`run_load`, taking turns in an order that rotates; each burst
returns its requests and the seconds they took as measured (wrk's "N requests in 1.02s", the
client's own clock), so that run.py can take requests/s over all the bursts of a round. Of
latency a burst returns its p50 and p99 only (all wrk prints), so a round's are the medians
of its bursts'.

``python bench/http_load.py serve|load '<orders as JSON>'`` (``bench/run.py`` does it).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import common  # puts the repository on sys.path
import experiments
from common import URL, ready_until_signal, orders, percentile

import crew
from crew import validation
from crew.gateway import CallHandler, make_app
from crew.httpapi import bad_request

#: The request body: a JSON string of about 100 bytes.
BODY = json.dumps("x" * 98)


class InlineCallHandler(CallHandler):
    """The gateway's ``/call/<task>`` handler, answering its JSON body itself."""

    async def post(self, task: str) -> None:
        if self.refused:
            return
        with bad_request():
            validation.validate_task_name(task)
        self.finish_json(self.json_body())


async def serve(spec: dict[str, Any]) -> None:
    from tornado.httpserver import HTTPServer

    client = crew.Client(URL)
    app = make_app(client)
    if spec["mode"] == "inline":
        app.add_handlers(r".*", [(r"/call/([^/]+)", InlineCallHandler)])
    else:
        await client.connect()
    server = HTTPServer(app)
    server.listen(spec["port"], "127.0.0.1")
    await ready_until_signal()
    server.stop()
    await client.close()


# --- load -------------------------------------------------------------------------------

async def _one_connection(port: int, request: bytes, until: float,
                          samples: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            samples.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def _load(spec: dict[str, Any]) -> dict[str, float]:
    body = spec["body"].encode()
    request = (f"POST {spec['path']} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    samples: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    until = started + spec["seconds"]
    await asyncio.gather(*(_one_connection(spec["port"], request, until, samples, errors)
                           for _ in range(spec["connections"])))
    elapsed = time.perf_counter() - started
    return {"requests": len(samples), "seconds": elapsed, "requests/s": len(samples) / elapsed,
            "p50 ms": 1000 * percentile(samples, 50),
            "p99 ms": 1000 * percentile(samples, 99), "errors": len(errors)}


def load(spec: dict[str, Any]) -> None:
    print(common.RESULT + json.dumps(asyncio.run(_load(spec))), flush=True)


#: The units of wrk's times (its format_time_us): past 1 s it counts in s, then m and h.
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    """A time as wrk prints it ("850.00us", "3.97ms", "1.02s", "1.50m") in seconds."""
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNIT_SECONDS[unit]


def run_wrk(port: int, path: str, connections: int, seconds: float) -> dict[str, float]:
    """One run of wrk (whole seconds, at least 1): its figures, from what it prints."""
    script = ('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
              f"wrk.body = {json.dumps(BODY)}\n")
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
             "-s", lua.name, f"http://127.0.0.1:{port}{path}"],
            capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return _wrk_figures(out)


def _wrk_figures(out: str) -> dict[str, float]:
    """What wrk printed, as figures; RuntimeError if it is not wrk's report."""
    # "1036 requests in 1.10s, 0.88MB read": wrk runs a little longer than -d says.
    done = re.search(r"^\s*(\d+) requests in ([\d.]+(?:us|ms|s|m|h)),", out, re.M)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    if not done or not rate or latency.keys() != {"50", "99"}:
        raise RuntimeError(f"wrk printed no report: {out!r}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {"requests": int(done.group(1)), "seconds": _seconds(done.group(2)),
            "requests/s": float(rate.group(1)),
            "p50 ms": 1000 * _seconds(latency["50"]), "p99 ms": 1000 * _seconds(latency["99"]),
            "errors": (int(non_2xx.group(1)) if non_2xx else 0)
            + (sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1)))
               if socket_errors else 0)}


def run_load(port: int, path: str, connections: int, seconds: float) -> dict[str, float]:
    """Load ``path`` with ``connections`` concurrent keep-alive connections for ``seconds``:
    requests, the seconds they took as measured, requests/s, p50 and p99 ms, errors."""
    if shutil.which("wrk"):
        return run_wrk(port, path, connections, seconds)
    spec = {"port": port, "path": path, "connections": connections, "seconds": seconds,
            "body": BODY}
    out = subprocess.run([sys.executable, str(common.BENCH / "http_load.py"), "load",
                          json.dumps(spec)], capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    return json.loads(next(line for line in out.splitlines()
                           if line.startswith(common.RESULT))[len(common.RESULT):])


def load_generator() -> str:
    return "wrk -t1" if shutil.which("wrk") else "asyncio keep-alive client (bench/http_load.py)"


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "serve":
        spec = orders()
        experiments.apply(spec.get("patches", []))
        asyncio.run(serve(spec))
    else:
        load(orders())
