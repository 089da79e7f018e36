"""Running crew's pytest plugin (:mod:`crew.testing`) in pytester's inner runs."""

from __future__ import annotations

import importlib.metadata
import shlex
import subprocess
from urllib.parse import unquote, urlsplit

import pytest

from crew.settings import split_urls
from tests.support.broker import rabbitmqctl_command


def plugin_args() -> list[str]:
    """Arguments of an inner run: ``-p crew.testing``, unless crew's ``pytest11`` entry
    point is installed (pytest then loads the plugin by itself, and ``-p`` would register it
    a second time, an error); no warning that this process imported it before the run."""
    quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    if any(entry.name == "crew" for entry in importlib.metadata.entry_points(group="pytest11")):
        return quiet
    return [*quiet, "-p", "crew.testing"]


def plugin_makes_vhosts(monkeypatch: pytest.MonkeyPatch, broker_url: str) -> list[str]:
    """Let the inner run make its own vhosts on the broker under test (not use
    ``$CREW_TEST_URL``); returns the ``rabbitmqctl`` command it will use."""
    command = rabbitmqctl_command()
    if command is None:
        pytest.fail("with CREW_TEST_URL, the plugin's vhost tests need CREW_TEST_RABBITMQCTL "
                    "(the rabbitmqctl of that broker's node)")
    monkeypatch.delenv("CREW_TEST_URL", raising=False)
    monkeypatch.setenv("CREW_TEST_BROKER", broker_url)  # its vhost does not count
    monkeypatch.setenv("CREW_TEST_RABBITMQCTL", shlex.join(command))
    return command


def vhost_of(url: str) -> str:
    """The vhost of ``url`` (of its first node, if it names several)."""
    return unquote(urlsplit(split_urls(url)[0]).path[1:]) or "/"


def vhosts(command: list[str]) -> set[str]:
    """The broker's vhosts, through ``command`` (its ``rabbitmqctl``)."""
    done = subprocess.run([*command, "-q", "list_vhosts"], check=True, capture_output=True,
                          text=True, timeout=60)
    return set(done.stdout.split()) - {"name"}

