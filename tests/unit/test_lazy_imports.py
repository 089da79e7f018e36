"""``import crew`` (any of its modules) does not import prometheus_client or OpenTelemetry,
which take tens of milliseconds: the first client or worker with metrics or traces on does.
:data:`crew.metrics.AVAILABLE` and :data:`crew.tracing.AVAILABLE` still say that both are
installed (the test extra installs them). Each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.processes import ROOT

SCRIPT = '''
import importlib, json, pkgutil, sys
import crew
from crew import metrics, tracing
from crew.worker import Worker

def extras():
    return sorted({name.split(".")[0] for name in sys.modules} &
                  {"prometheus_client", "opentelemetry"})

imported = extras()
for module in pkgutil.iter_modules(crew.__path__):
    if module.name != "__main__":  # that one runs the command line
        importlib.import_module(f"crew.{module.name}")
print(json.dumps([metrics.AVAILABLE, tracing.AVAILABLE, imported, extras()]))
%s
print(json.dumps(extras()))
'''


def run(code: str) -> tuple[bool, bool, list[str], list[str], list[str]]:
    env = {name: value for name, value in os.environ.items()
           if name not in ("CREW_METRICS", "CREW_TRACES")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", SCRIPT % code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    first, last = done.stdout.splitlines()[-2:]
    metrics_available, tracing_available, by_crew, by_every_module = json.loads(first)
    return metrics_available, tracing_available, by_crew, by_every_module, json.loads(last)


@pytest.mark.parametrize("code, imported", [
    ("", []),
    ("crew.Client(metrics=False, traces=False)", []),
    ("Worker({'t': print}, metrics=False, traces=False)", []),
    ("crew.Client(metrics=True, traces=False)", ["prometheus_client"]),
    ("crew.Client(metrics=False, traces=True)", ["opentelemetry"]),
    ("Worker({'t': print}, metrics=True, traces=False)", ["prometheus_client"]),
    ("Worker({'t': print}, metrics=False, traces=True)", ["opentelemetry"]),
    ("crew.SyncClient()", ["opentelemetry", "prometheus_client"]),  # on by default
    ("metrics.exposition()", ["prometheus_client"]),
])
def test_crew_imports_metrics_and_traces_libraries_only_when_used(code, imported):
    assert run(code) == (True, True, [], [], imported)
