"""``python -m crew.gateway``'s options, without a broker (the process serving:
tests/broker/test_gateway_main.py)."""

from __future__ import annotations

import pytest

from crew import gateway


def test_main_refuses_bad_options_with_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        gateway.main(["--max-body", "0"])
    assert exited.value.code == 2
    assert "max_body must be" in capsys.readouterr().err


def test_main_help_names_the_gateway_options(capsys):
    with pytest.raises(SystemExit) as exited:
        gateway.main(["--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m crew.gateway")
    assert "--broker-port" in usage and "--poll-timeout" in usage and "--max-body" in usage


def test_main_refuses_a_host_with_several_urls_with_usage(capsys):
    with pytest.raises(SystemExit) as exited:
        gateway.main(["--url", "amqp://a:5672/,amqp://b:5672/", "-H", "c"])
    assert exited.value.code == 2
    assert "several broker URLs" in capsys.readouterr().err
