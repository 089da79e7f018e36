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
from urllib.parse import unquote, urlsplit


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


def delete_bound_queues(broker_url: str, exchange: str) -> list[str]:
    """Delete every queue bound to ``exchange`` in ``broker_url``'s vhost, with the broker
    under test's ``rabbitmqctl`` (the broker cancels their consumers); return their names.
    Fails if that command is not known or no queue is bound."""
    rabbitmqctl = rabbitmqctl_command()
    assert rabbitmqctl, "set CREW_TEST_RABBITMQCTL with CREW_TEST_URL: this test deletes a queue"
    vhost = ["-p", unquote(urlsplit(broker_url).path[1:]) or "/"]
    bindings = subprocess.run([*rabbitmqctl, "-q", *vhost, "list_bindings", "source_name",
                               "destination_name"], check=True, capture_output=True,
                              text=True, timeout=60).stdout
    queues = [line.split("\t")[1] for line in bindings.splitlines()
              if line.startswith(f"{exchange}\t")]
    assert queues, bindings
    for queue in queues:
        subprocess.run([*rabbitmqctl, "-q", *vhost, "delete_queue", queue], check=True,
                       capture_output=True, timeout=60)
    return queues
