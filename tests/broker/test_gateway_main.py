"""``python -m crew.gateway`` and ``crew gateway``: the gateway's command line
(crew.gateway.main) run as a process."""

from __future__ import annotations

import json
import re

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.support.processes import Output, spawn_python, stop


@pytest.mark.gen_test(timeout=60)
@pytest.mark.parametrize("command", [["-m", "crew.gateway"], ["-m", "crew", "gateway"]])
async def test_gateway_as_a_process_serves_until_sigterm(broker_url, command):
    proc = spawn_python([*command, "--port", "0"], broker_url)
    output = Output(proc)
    try:
        listening = await output.wait_for("listening on http://")
        port = re.search(r":(\d+)/", listening).group(1)
        base = f"http://127.0.0.1:{port}"
        http = AsyncHTTPClient()
        health = await http.fetch(f"{base}/health")
        assert json.loads(health.body) == {"broker": "up", "listeners": 0}
        unknown = await http.fetch(f"{base}/call/no-such-task", method="POST", body="1",
                                   raise_error=False)
        assert unknown.code == 404 and json.loads(unknown.body)["error"] == "UnknownTaskError"
        page = await http.fetch(f"{base}/dashboard")
        assert b"crew dashboard" in page.body
    finally:
        code = await stop(proc, output)
        print(output.everything())  # shown by pytest when the test fails
    assert code == 0


@pytest.mark.gen_test(timeout=60)
async def test_no_dashboard_and_read_only(broker_url):
    proc = spawn_python(["-m", "crew.gateway", "--port", "0", "--no-dashboard", "--read-only"],
                        broker_url)
    output = Output(proc)
    try:
        listening = await output.wait_for("listening on http://")
        port = re.search(r":(\d+)/", listening).group(1)
        base = f"http://127.0.0.1:{port}"
        http = AsyncHTTPClient()
        page = await http.fetch(f"{base}/dashboard", raise_error=False)
        assert page.code == 404
        call = await http.fetch(f"{base}/call/test", method="POST", body="1", raise_error=False)
        assert call.code == 403 and json.loads(call.body)["error"] == "ReadOnly"
        assert "dashboard: watching" not in output.everything()  # no watcher at all
    finally:
        code = await stop(proc, output)
        print(output.everything())
    assert code == 0
