"""A RabbitMQ 4.x cluster for tests, run by ``scripts/rabbitmq-cluster`` at a base port of the
test's own: start, stop, and the faults a test injects (a node killed with ``kill -9`` and
restarted with its data, ``rabbitmqctl`` commands), and where a quorum queue's leader is.

The script needs root: it builds (or reuses) a Debian root with the newest RabbitMQ and runs
the nodes in it with chroot, beside the machine's broker, which it never touches. Without
root, or when the script fails, :func:`cluster_nodes` fails the test and says why: the tests
that need a cluster are never skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "rabbitmq-cluster"
#: Seconds the script may take: prepare reuses a cached root (building one takes a minute or
#: two), three nodes boot in about 6 s.
SCRIPT_TIMEOUT = 900


class Cluster:
    """The nodes started at ``base_port`` (``crewcN@localhost``, AMQP 127.0.0.1:N)."""

    def __init__(self, base_port: int) -> None:
        self.base_port = base_port
        self.urls: list[str] = []

    def script(self, *args: str, timeout: float = SCRIPT_TIMEOUT) -> str:
        """``scripts/rabbitmq-cluster --base-port P ARGS``: its stdout, or the test fails
        with its stderr."""
        done = subprocess.run([str(SCRIPT), "--base-port", str(self.base_port), *args],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            pytest.fail(f"scripts/rabbitmq-cluster {' '.join(args)} failed "
                        f"({done.returncode}):\n{done.stderr[-3000:]}", pytrace=False)
        return done.stdout

    def start(self, nodes: int) -> list[str]:
        """Prepare the root and start ``nodes`` nodes (1 or 3); their amqp URLs."""
        if os.geteuid() != 0:
            pytest.fail("the cluster tests need root: scripts/rabbitmq-cluster builds a Debian "
                        "root and runs RabbitMQ 4.x nodes in it with chroot", pytrace=False)
        self.script("prepare")
        self.urls = [line.strip() for line in self.script("start", "--nodes", str(nodes))
                     .splitlines() if line.startswith("amqp://")]
        assert len(self.urls) == nodes, f"the script printed {self.urls}"
        return self.urls

    def stop(self) -> None:
        """Stop every node of this base port (quietly: also after a failed start)."""
        subprocess.run([str(SCRIPT), "--base-port", str(self.base_port), "stop"],
                       capture_output=True, timeout=300)

    def ctl(self, node: int, *args: str, timeout: float = 120) -> str:
        return self.script("ctl", str(node), *args, timeout=timeout)

    def kill(self, node: int) -> None:
        """``kill -9`` node ``node`` (1-3)."""
        self.script("kill", str(node), timeout=60)

    def restart(self, node: int) -> None:
        """Start node ``node`` again with its data, and wait until it runs."""
        self.script("restart", str(node), timeout=300)

    def node_of(self, name: str) -> int:
        """The index (1-3) of the node named ``crewcN@localhost``."""
        port = int(re.fullmatch(r"crewc(\d+)@localhost", name)[1])  # type: ignore[index]
        return port - self.base_port + 1

    def queues(self, node: int, vhost: str = "crew") -> list[dict[str, object]]:
        """Every queue of ``vhost`` as node ``node`` sees it: name, type, leader, messages
        (ready and unacknowledged)."""
        out = self.ctl(node, "-q", "-p", vhost, "list_queues", "--formatter", "json", "name",
                       "type", "leader", "messages_ready", "messages_unacknowledged")
        return list(json.loads(out or "[]"))

    def leader(self, node: int, queue: str, vhost: str = "crew") -> int:
        """The node (1-3) that leads quorum queue ``queue``, as node ``node`` sees it."""
        for row in self.queues(node, vhost):
            if row["name"] == queue:
                return self.node_of(str(row["leader"]))
        raise AssertionError(f"no queue {queue} on vhost {vhost}")


@contextlib.contextmanager
def cluster_nodes(base_port: int, nodes: int) -> Iterator[Cluster]:
    """A started :class:`Cluster`, stopped afterwards (also when the test fails)."""
    cluster = Cluster(base_port)
    try:
        cluster.start(nodes)
        yield cluster
    finally:
        cluster.stop()
