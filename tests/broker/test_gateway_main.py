"""``python -m crew.gateway`` and ``crew gateway``: the gateway's command line
(crew.gateway.main) run as a process."""

from __future__ import annotations

import contextlib
import json
import re
from typing import AsyncIterator

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.support.processes import Output, spawn_python, stop


@contextlib.asynccontextmanager
async def gateway_process(broker_url: str, *args: str) -> AsyncIterator[tuple[str, Output]]:
    """The gateway run as ``python ARGS --port 0``: its base URL and its output; stopped
    with SIGTERM afterwards, which it must exit 0 from."""
    proc = spawn_python([*args, "--port", "0"], broker_url)
    output = Output(proc)
    try:
        listening = await output.wait_for("listening on http://")
        port = re.search(r":(\d+)/", listening).group(1)
        yield f"http://127.0.0.1:{port}", output
    finally:
        code = await stop(proc, output)
        print(output.everything())  # shown by pytest when the test fails
    assert code == 0


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("command", [["-m", "crew.gateway"], ["-m", "crew", "gateway"]])
async def test_gateway_as_a_process_serves_until_sigterm(broker_url, command):
    async with gateway_process(broker_url, *command) as (base, _output):
        http = AsyncHTTPClient()
        health = await http.fetch(f"{base}/health")
        assert json.loads(health.body) == {"broker": "up", "listeners": 0}
        unknown = await http.fetch(f"{base}/call/no-such-task", method="POST", body="1",
                                   raise_error=False)
        assert unknown.code == 404 and json.loads(unknown.body)["error"] == "UnknownTaskError"
        page = await http.fetch(f"{base}/dashboard")
        assert b"crew dashboard" in page.body


@pytest.mark.gen_test(timeout=60)
async def test_no_dashboard_and_read_only(broker_url):
    async with gateway_process(broker_url, "-m", "crew.gateway", "--no-dashboard",
                               "--read-only") as (base, output):
        http = AsyncHTTPClient()
        page = await http.fetch(f"{base}/dashboard", raise_error=False)
        assert page.code == 404
        call = await http.fetch(f"{base}/call/test", method="POST", body="1", raise_error=False)
        assert call.code == 403 and json.loads(call.body)["error"] == "ReadOnly"
        assert "dashboard: watching" not in output.everything()  # no watcher at all
