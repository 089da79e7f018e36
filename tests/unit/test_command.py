"""The ``crew`` command without a broker: its help (complete, readable, the exit statuses),
the README's table of them, the console script, a worker's presence map and the readable
tables made of such maps. tests/broker/test_command.py runs every subcommand for real."""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from crew import codec, protocol
from crew.calls import CallHandler
from crew.census import find_call, inspect_table, status_tables, table
from crew.command import EXIT_CODES, build_parser, main
from crew.context import Publisher
from crew.figures import Figures
from crew.jobs import Job, Scope
from crew.presence import PRESENCE_VERSION, Presence
from crew.registry import Settings
from crew.settings import DEFAULT_MAX_MEMORY

ROOT = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ["worker", "call", "publish", "subscribe", "status", "inspect", "cancel",
               "purge", "gateway"]


def help_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_help_lists_every_subcommand_and_exit_status(capsys):
    text = help_of(capsys)
    for name in SUBCOMMANDS:
        assert re.search(rf"^    {name}\b", text, re.MULTILINE), name
    for code, _meaning in EXIT_CODES:
        assert re.search(rf"^ +{code}  \w", text, re.MULTILINE), code
    assert max(len(line) for line in text.splitlines()) <= 100


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_a_complete_help(capsys, name):
    text = help_of(capsys, name)
    assert text.startswith(f"usage: crew {name}")
    for option in ("--url", "--vhost", "--user", "-H", "-P" if name != "gateway" else
                   "--broker-port"):
        assert option in text, option
    assert "--password" not in text and "CREW_PASSWORD" in text
    if name not in ("worker", "gateway"):  # theirs are crew.cli's and crew.gateway's
        parser = subparsers()[name]
        assert parser.description
        assert all(action.help for action in parser._actions), name


def test_the_worker_subcommand_takes_every_option_run_takes(capsys):
    text = help_of(capsys, "worker")
    for option in ("MODULE", "-c", "--concurrency", "--forks", "--grace", "--max-stuck",
                   "--max-memory", "--max-priority", "--queue-type", "--logging"):
        assert option in text, option


def test_python_dash_m_crew_is_the_command():
    result = subprocess.run([sys.executable, "-m", "crew", "--help"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: crew")
    result = subprocess.run([sys.executable, "-m", "crew", "frobnicate"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_setup_installs_the_crew_console_script_of_this_version(capsys):
    setup = (ROOT / "setup.py").read_text()
    assert '"crew = crew.command:main"' in setup and f'version="{protocol.VERSION}"' in setup
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"crew {protocol.VERSION}\n"


def test_the_readme_tables_the_same_exit_statuses():
    section = (ROOT / "README.md").read_text().split("## The crew command", 1)[1]
    rows = re.findall(r"^\| (\d+) \| ", section.split("\n## ", 1)[0], re.MULTILINE)
    assert [int(code) for code in rows] == [code for code, _meaning in EXIT_CODES]


# --- a worker's presence map, and the tables made of it --------------------------------------

def _job(calls: CallHandler, task: str, correlation_id: str) -> Job:
    body, _ = codec.encode(None)
    job = Job(None, task, lambda _x: None, 1, correlation_id, "amq.gen-caller",
              protocol.MSGPACK, None, body, {}, time.monotonic() + 60)
    calls.replies.add(job)
    return job


def _presence() -> tuple[Presence, CallHandler]:
    scope = Scope(Settings(), Publisher(lambda *_args: None))
    calls = CallHandler(scope, concurrency=2, worker_id="w" * 32, max_memory=DEFAULT_MAX_MEMORY,
                        max_stuck=3, call_in_loop=lambda func, *args: func(*args),
                        on_too_many_stuck=lambda: None)
    calls.start(asyncio.get_running_loop())
    return Presence(calls, Figures(), "w" * 32, {"b": print, "a": print}, protocol.CLASSIC,
                    10, 2, 3), calls


def test_the_presence_map_tells_who_the_worker_is_and_what_it_serves():
    async def snapshot() -> dict[str, Any]:
        presence, calls = _presence()
        assert _job(calls, "a", "c.1").watch.begin()  # running; c.2 waits for a thread
        _job(calls, "b", "c.2")
        return presence.snapshot()

    before = protocol.now_ms()
    found = asyncio.run(snapshot())
    assert found["v"] == PRESENCE_VERSION == 1
    assert (found["worker"], found["tasks"], found["version"]) == ("w" * 32, ["a", "b"],
                                                                   protocol.VERSION)
    assert (found["concurrency"], found["busy"], found["waiting"], found["stuck"]) == (2, 1, 1, 0)
    assert (found["queue_type"], found["max_priority"], found["max_stuck"]) == ("classic", 10, 3)
    assert isinstance(found["pid"], int) and found["host"] and found["uptime"] >= 0
    assert before <= found["started"] <= found["at"] <= protocol.now_ms()
    first = found["calls"][0]
    assert (first["task"], first["correlation_id"], first["caller"], first["state"]) == (
        "a", "c.1", "amq.gen-caller", "running")
    assert found["calls"][1]["state"] == "waiting"
    assert 0 <= first["elapsed"] < 5 and first["received"] <= found["at"]
    assert abs(first["deadline"] - (found["at"] + 60_000)) < 5_000
    assert codec.decode(codec.serialize(found), protocol.MSGPACK) == found


def test_the_readable_tables():
    assert table(["A", "LONGER"], [["xyz", None], [1, 2]]) == "A    LONGER\nxyz  -\n1    2"
    worker = {"worker": "w1", "host": "h", "pid": 7, "version": "0.1.0", "busy": 2,
              "concurrency": 2, "stuck": 1, "uptime": 300.0, "tasks": ["a"],
              "calls": [{"task": "a", "correlation_id": "c.1", "caller": "q", "state": "running",
                         "elapsed": 1.5, "deadline": protocol.now_ms() + 30_000}]}
    report = {"tasks": [{"task": "a", "exists": True, "messages": 4, "consumers": 1,
                         "queue_type": "classic", "max_priority": 10, "workers": 1},
                        {"task": "gone", "exists": False, "messages": None, "consumers": None,
                         "queue_type": None, "max_priority": None, "workers": 0}],
               "workers": [worker]}
    text = status_tables(report)
    assert "no queue" in text and "2/2" in text and "5m" in text
    assert text.endswith("1 worker(s) answered")
    assert "c.1" in inspect_table([worker]) and "1.5s" in inspect_table([worker])
    assert find_call([worker], "c.1") == (worker, worker["calls"][0])
    assert find_call([worker], "c.2") is None
