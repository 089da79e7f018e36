"""BrokerSettings: URL parsing, environment, overrides, and never showing the password."""

from __future__ import annotations

import dataclasses
import ssl

import pytest

from crew import BrokerSettings, settings

NO_ENV: dict[str, str] = {}


def test_defaults_without_url_or_environment():
    s = BrokerSettings.from_url(environ=NO_ENV)
    assert (s.host, s.port, s.vhost, s.user, s.password, s.tls) == (
        "localhost", 5672, "/", "guest", "guest", False)
    assert s.heartbeat == settings.DEFAULT_HEARTBEAT and s.verify is True


def test_full_url():
    s = BrokerSettings.from_url("amqp://alice:s3cret@rabbit.example:5673/prod", environ=NO_ENV)
    assert (s.host, s.port, s.vhost, s.user, s.password, s.tls) == (
        "rabbit.example", 5673, "prod", "alice", "s3cret", False)


def test_amqp_default_port_is_5672_and_amqps_default_port_is_5671():
    assert BrokerSettings.from_url("amqp://h", environ=NO_ENV).port == 5672
    s = BrokerSettings.from_url("amqps://h", environ=NO_ENV)
    assert (s.port, s.tls) == (5671, True)
    assert BrokerSettings.from_url("amqps://h:5999", environ=NO_ENV).port == 5999


@pytest.mark.parametrize("url", ["amqp://h", "amqp://h/", "amqp://h/%2F", "amqp://h:5672/%2f"])
def test_default_vhost_spellings_all_mean_slash(url):
    assert BrokerSettings.from_url(url, environ=NO_ENV).vhost == "/"


def test_vhost_and_credentials_are_percent_decoded():
    s = BrokerSettings.from_url("amqp://us%40er:p%3Ass%2Fw@h/team%2Fa", environ=NO_ENV)
    assert (s.user, s.password, s.vhost) == ("us@er", "p:ss/w", "team/a")


def test_query_options():
    s = BrokerSettings.from_url(
        "amqps://h/?heartbeat=5&verify=false&cafile=/ca.pem&certfile=/c.pem&keyfile=/k.pem",
        environ=NO_ENV)
    assert (s.heartbeat, s.verify, s.cafile, s.certfile, s.keyfile) == (
        5, False, "/ca.pem", "/c.pem", "/k.pem")
    assert BrokerSettings.from_url("amqp://h/?verify=yes", environ=NO_ENV).verify is True


def test_unknown_query_options_are_refused():
    with pytest.raises(ValueError, match="unknown broker URL options: frame_max, locale"):
        BrokerSettings.from_url("amqp://h/?locale=en&frame_max=1", environ=NO_ENV)


@pytest.mark.parametrize("url", ["http://h/", "redis://h", "amqpx://h", "h:5672"])
def test_other_schemes_are_refused(url):
    with pytest.raises(ValueError, match="amqp:// or amqps://"):
        BrokerSettings.from_url(url, environ=NO_ENV)


def test_invalid_port_is_refused():
    with pytest.raises(ValueError, match="invalid port"):
        BrokerSettings.from_url("amqp://h:notaport/", environ=NO_ENV)


def test_explicit_overrides_win_and_none_means_not_given():
    s = BrokerSettings.from_url("amqp://alice:pw@h:5673/v", environ=NO_ENV, host="other",
                                port=None, vhost="w", user=None)
    assert (s.host, s.port, s.vhost, s.user, s.password) == ("other", 5673, "w", "alice", "pw")


def test_tls_override_moves_the_default_port():
    s = BrokerSettings.from_url("amqp://h", environ=NO_ENV, tls=True)
    assert (s.tls, s.port) == (True, 5671)
    assert BrokerSettings.from_url("amqp://h", environ=NO_ENV, tls=True, port=5999).port == 5999


def test_tls_override_moves_the_default_port_when_port_is_none():
    assert BrokerSettings.from_url("amqp://h", environ=NO_ENV, tls=True, port=None).port == 5671


def test_crew_url_from_the_environment():
    s = BrokerSettings.from_url(environ={"CREW_URL": "amqp://bob:pw@envhost:5680/envv"})
    assert (s.host, s.port, s.vhost, s.user, s.password) == (
        "envhost", 5680, "envv", "bob", "pw")


def test_url_argument_beats_crew_url():
    s = BrokerSettings.from_url("amqp://arg", environ={"CREW_URL": "amqp://env"})
    assert s.host == "arg"


def test_crew_password_fills_a_url_without_password():
    env = {"CREW_URL": "amqp://bob@h/", "CREW_PASSWORD": "from-env"}
    assert BrokerSettings.from_url(environ=env).password == "from-env"


def test_password_in_the_url_beats_crew_password():
    env = {"CREW_PASSWORD": "from-env"}
    assert BrokerSettings.from_url("amqp://bob:in-url@h/", environ=env).password == "in-url"


def test_crew_password_file(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("from-file\n", encoding="utf-8")
    env = {"CREW_URL": "amqp://bob@h/", "CREW_PASSWORD_FILE": str(secret)}
    assert BrokerSettings.from_url(environ=env).password == "from-file"  # newline stripped


def test_crew_password_beats_crew_password_file(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("from-file", encoding="utf-8")
    env = {"CREW_PASSWORD": "from-env", "CREW_PASSWORD_FILE": str(secret)}
    assert BrokerSettings.from_url("amqp://bob@h/", environ=env).password == "from-env"


def test_environ_parameter_replaces_os_environ(monkeypatch):
    monkeypatch.setenv("CREW_URL", "amqp://from-os-environ")
    assert BrokerSettings.from_url(environ=NO_ENV).host == "localhost"
    assert BrokerSettings.from_url().host == "from-os-environ"


@pytest.mark.parametrize("make", [
    lambda: BrokerSettings.from_url("amqp://alice:hunter2secret@h/v", environ=NO_ENV),
    lambda: BrokerSettings.from_url("amqp://alice@h/v",
                                    environ={"CREW_PASSWORD": "hunter2secret"}),
    lambda: BrokerSettings(password="hunter2secret"),
])
def test_password_never_shows_in_repr_or_safe_url(make):
    s = make()
    assert s.password == "hunter2secret"
    for text in (repr(s), str(s), s.safe_url):
        assert "hunter2secret" not in text
    assert ":***@" in s.safe_url


def test_safe_url_shape():
    s = BrokerSettings.from_url("amqps://al ice:pw@h:5999/a/b", environ=NO_ENV)
    assert s.safe_url == "amqps://al%20ice:***@h:5999/a%2Fb"
    assert BrokerSettings.from_url("amqp://h", environ=NO_ENV).safe_url == (
        "amqp://guest:***@h:5672/%2F")


def test_settings_are_frozen():
    s = BrokerSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.password = "changed"  # type: ignore[misc]


def test_pika_parameters_carry_the_settings():
    s = BrokerSettings.from_url("amqp://alice:pw@h:5673/v?heartbeat=7", environ=NO_ENV)
    params = s.pika_parameters()
    assert (params.host, params.port, params.virtual_host, params.heartbeat) == (
        "h", 5673, "v", 7)
    assert (params.credentials.username, params.credentials.password) == ("alice", "pw")
    assert params.ssl_options is None


def test_tls_context_verifies_unless_told_not_to():
    assert BrokerSettings(tls=True).ssl_context().verify_mode == ssl.CERT_REQUIRED
    relaxed = BrokerSettings(tls=True, verify=False).ssl_context()
    assert relaxed.verify_mode == ssl.CERT_NONE and relaxed.check_hostname is False
