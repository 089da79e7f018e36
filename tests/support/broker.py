"""The broker under test: whether it answers, and the command that runs its ``rabbitmqctl``.

Against the shared broker that is ``rabbitmqctl`` on the ``PATH``; with ``CREW_TEST_URL``,
set ``CREW_TEST_RABBITMQCTL`` to a command line that runs ``rabbitmqctl`` for that broker's
node (split like a shell line; the tests add ``-p VHOST`` and the command), e.g.
``rabbitmqctl -n NODE@localhost``, or a script that runs the ``rabbitmqctl`` of a node
installed in a chroot (another RabbitMQ version needs its own ``rabbitmqctl``). Without it
the tests that count unacknowledged messages fall back to a passive declare, which sees
ready messages only.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess


def broker_answers(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def rabbitmqctl_command() -> list[str] | None:
    """The command that runs ``rabbitmqctl`` for the broker under test: plain
    ``rabbitmqctl`` for the shared broker; with ``$CREW_TEST_URL``, the command in
    ``$CREW_TEST_RABBITMQCTL``, or None if that is not set."""
    if not os.environ.get("CREW_TEST_URL"):
        return ["rabbitmqctl"]
    command = os.environ.get("CREW_TEST_RABBITMQCTL", "").strip()
    return shlex.split(command) if command else None


def rabbitmqctl(*args: str) -> None:
    """Run the shared broker's ``rabbitmqctl`` quietly; raise if it fails."""
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)
