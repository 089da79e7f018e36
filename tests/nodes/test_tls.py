"""Connections and credentials: amqps:// against private TLS-enabled RabbitMQ nodes, and
passwords that never show.

The test CA, the server certificate (valid for IP 127.0.0.1 and DNS localhost) and client
certificates are made with the ``openssl`` command in a temporary directory. Two private nodes
run beside the shared broker (which is never touched), started together once per session:

- ``crewtls@localhost``: AMQP 127.0.0.1:5685, TLS 127.0.0.1:5686, distribution port 25686;
  verifies a client certificate if one is offered (``fail_if_no_peer_cert = false``);
- ``crewmtls@localhost``: AMQP 127.0.0.1:5687, TLS 127.0.0.1:5688, distribution port 25688;
  requires one (``fail_if_no_peer_cert = true``).

Both have a user ``crewtls`` whose password appears nowhere but in the URLs given to crew,
so that any leak of it into an error message or a log record is caught. Skipped, with the
reason, when ``rabbitmq-server`` or ``openssl`` is missing.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from crew import BrokerSettings, Client, ConnectionLostError
from tests.support.brokernode import PrivateNode, rabbitmq_sbin

#: Seconds a node may take to boot (about 7 on this kind of machine, two at once a bit more).
BOOT_TIMEOUT = 90
#: Password of the ``crewtls`` user: random, so that it can be searched for in any output.
PASSWORD = "pw-" + secrets.token_hex(12)


# --- certificates --------------------------------------------------------------------------

OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path  # signed by another CA than the nodes trust
    rogue_client_key: Path


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", "-config", "openssl.cnf", "-extensions", "ca",
             "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem")


def _make_leaf(folder: Path, name: str, common_name: str, ca: str, kind: str) -> None:
    _openssl(folder, "req", "-new", "-config", "openssl.cnf", "-newkey", "ec",
             "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={common_name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-set_serial", str(secrets.randbits(63)), "-days", "2",
             "-extfile", "openssl.cnf", "-extensions", kind, "-out", f"{name}.pem")


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "openssl.cnf").write_text(OPENSSL_CONFIG)
    _make_ca(folder, "ca")
    _make_ca(folder, "rogue-ca")
    _make_leaf(folder, "server", "localhost", "ca", "server")
    _make_leaf(folder, "client", "crew-client", "ca", "client")
    _make_leaf(folder, "rogue-client", "crew-client", "rogue-ca", "client")
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key",
               folder / "client.pem", folder / "client.key", folder / "rogue-client.pem",
               folder / "rogue-client.key")


# --- private TLS nodes ---------------------------------------------------------------------


class TlsNode(PrivateNode):
    """A private node (:class:`brokernode.PrivateNode`) with a TLS listener as well."""

    def __init__(self, base: Path, sbin: Path, name: str, amqp_port: int, tls_port: int,
                 dist_port: int, pki: Pki, require_client_cert: bool) -> None:
        super().__init__(base, sbin, name, amqp_port, dist_port, conf=[
            f"listeners.ssl.local = 127.0.0.1:{tls_port}",
            f"ssl_options.cacertfile = {pki.ca}",
            f"ssl_options.certfile = {pki.server_cert}",
            f"ssl_options.keyfile = {pki.server_key}",
            "ssl_options.verify = verify_peer",
            f"ssl_options.fail_if_no_peer_cert = {str(require_client_cert).lower()}",
        ])
        self.tls_port = tls_port

    def wait_ready(self, timeout: float) -> None:
        """Booted and speaking AMQP (:meth:`PrivateNode.wait_ready`), then one TLS handshake
        on the TLS listener."""
        super().wait_ready(timeout)
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", self.tls_port), timeout=10) as raw:
            with context.wrap_socket(raw):
                pass  # the handshake succeeded (a node requiring a client cert may close
                # the connection after it, which is fine here)


@dataclass(frozen=True)
class TlsSetup:
    pki: Pki
    optional: TlsNode  # verifies a client certificate if offered
    required: TlsNode  # refuses a connection without one

    def url(self, node: TlsNode, query: str = "", host: str = "127.0.0.1") -> str:
        return (f"amqps://crewtls:{quote(PASSWORD, safe='')}@{host}:{node.tls_port}/"
                + (f"?{query}" if query else ""))


@pytest.fixture(scope="session")
def tls() -> Iterator[TlsSetup]:
    sbin = rabbitmq_sbin()
    if sbin is None:
        pytest.skip("rabbitmq-server is not installed: no private TLS node")
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing: no test certificates")
    base = Path(tempfile.mkdtemp(prefix="crew-tls-"))
    nodes: list[TlsNode] = []
    try:
        pki = make_pki(base / "pki")
        nodes = [TlsNode(base / "optional", sbin, "crewtls@localhost", 5685, 5686, 25686, pki,
                         require_client_cert=False),
                 TlsNode(base / "required", sbin, "crewmtls@localhost", 5687, 5688, 25688, pki,
                         require_client_cert=True)]
        for node in nodes:  # both boot at once
            node.launch()
        end = time.monotonic() + BOOT_TIMEOUT
        for node in nodes:
            node.wait_ready(max(5.0, end - time.monotonic()))
            node.ctl("add_user", "crewtls", PASSWORD)
            node.ctl("set_permissions", "-p", "/", "crewtls", ".*", ".*", ".*")
        yield TlsSetup(pki, *nodes)
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


def _no_secret_anywhere(secret: str, error: BaseException, caplog: pytest.LogCaptureFixture
                        ) -> None:
    assert secret not in str(error) and secret not in repr(error)
    for record in caplog.records:
        text = " ".join([record.getMessage(), record.exc_text or "",
                         repr(record.args), str(record.exc_info or "")])
        assert secret not in text, f"password in a log record of {record.name}"


# --- amqps -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.gen_test(timeout=60)
async def test_worker_and_client_call_over_amqps_with_a_ca_file(tls, make_worker, uid, host):
    url = tls.url(tls.optional, f"cafile={tls.pki.ca}", host=host)
    task = f"echo.{uid}"
    make_worker({task: lambda x: {"over": "tls", "got": x}}, broker=url)
    client = Client(url)
    await client.connect(timeout=10)
    try:
        assert await client.call(task, "hi", expiration=10) == {"over": "tls", "got": "hi"}
    finally:
        await client.close()
    assert "true" in tls.optional.ctl("list_connections", "ssl")  # TLS, not plain AMQP


@pytest.mark.gen_test(timeout=60)
async def test_without_the_ca_file_the_connection_is_refused(tls, caplog):
    caplog.set_level(logging.DEBUG)  # pika's own logs included
    client = Client(tls.url(tls.optional))  # the test CA is not among the system's CAs
    with pytest.raises(ConnectionLostError) as info:
        await client.connect(timeout=0)
    assert "amqps://crewtls:***@127.0.0.1:5686/" in str(info.value)
    _no_secret_anywhere(PASSWORD, info.value, caplog)
    assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)


@pytest.mark.gen_test(timeout=60)
async def test_without_the_ca_file_the_error_says_certificate_verification_failed(tls):
    with pytest.raises(ConnectionLostError) as info:
        await Client(tls.url(tls.optional)).connect(timeout=0)
    message = str(info.value)
    assert "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message


@pytest.mark.gen_test(timeout=60)
async def test_verify_false_connects_without_checking_anything(tls):
    client = Client(tls.url(tls.optional, "verify=false"))  # unsafe: documented as such
    await client.connect(timeout=10)
    await client.close()


def test_settings_verify_the_broker_certificate_by_default():
    context = BrokerSettings.from_url("amqps://h/", environ={}).ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    unsafe = BrokerSettings.from_url("amqps://h/?verify=false", environ={}).ssl_context()
    assert unsafe.verify_mode == ssl.CERT_NONE and not unsafe.check_hostname


@pytest.mark.gen_test(timeout=60)
async def test_client_certificate_is_accepted_where_the_node_requires_one(tls, make_worker,
                                                                          uid):
    pki = tls.pki
    url = tls.url(tls.required,
                  f"cafile={pki.ca}&certfile={pki.client_cert}&keyfile={pki.client_key}")
    task = f"echo.{uid}"
    make_worker({task: lambda x: x}, broker=url)
    client = Client(url)
    await client.connect(timeout=10)
    try:
        assert await client.call(task, "mutual", expiration=10) == "mutual"
    finally:
        await client.close()


@pytest.mark.parametrize("certificate", ["none", "rogue"])
@pytest.mark.gen_test(timeout=60)
async def test_node_requiring_a_client_certificate_refuses_none_or_a_rogue_one(
        tls, caplog, certificate):
    caplog.set_level(logging.DEBUG)
    pki = tls.pki
    query = f"cafile={pki.ca}"
    if certificate == "rogue":
        query += f"&certfile={pki.rogue_client_cert}&keyfile={pki.rogue_client_key}"
    client = Client(tls.url(tls.required, query))
    with pytest.raises(ConnectionLostError) as info:
        await client.connect(timeout=0)
    _no_secret_anywhere(PASSWORD, info.value, caplog)


@pytest.mark.gen_test(timeout=60)
async def test_wrong_password_on_amqps_names_no_password(tls, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + secrets.token_hex(8)
    url = tls.url(tls.optional, f"cafile={tls.pki.ca}").replace(quote(PASSWORD, safe=""),
                                                                wrong)
    with pytest.raises(ConnectionLostError) as info:
        await Client(url).connect(timeout=0)
    assert "ACCESS_REFUSED" in str(info.value) or "403" in str(info.value)
    _no_secret_anywhere(wrong, info.value, caplog)


# --- credentials on the shared broker -------------------------------------------------------


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}"))


@pytest.mark.gen_test(timeout=30)
async def test_wrong_password_gives_connection_lost_and_never_shows(broker_url, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "hunter2-" + secrets.token_hex(8)
    parts = urlsplit(broker_url)
    url = urlunsplit(parts._replace(
        netloc=f"{parts.username}:{wrong}@{parts.hostname}:{parts.port}"))
    with pytest.raises(ConnectionLostError) as info:
        await Client(url).connect(timeout=0)
    assert "ACCESS_REFUSED" in str(info.value) or "403" in str(info.value)
    assert ":***@" in str(info.value)
    _no_secret_anywhere(wrong, info.value, caplog)


@pytest.mark.parametrize("source", ["CREW_PASSWORD", "CREW_PASSWORD_FILE"])
@pytest.mark.gen_test(timeout=30)
async def test_password_from_the_environment_or_a_file_logs_in(broker_url, tmp_path, caplog,
                                                               source):
    caplog.set_level(logging.DEBUG)
    password = urlsplit(broker_url).password or "guest"
    if source == "CREW_PASSWORD":
        environ = {"CREW_PASSWORD": password}
    else:
        secret = tmp_path / "password"
        secret.write_text(password + "\n", encoding="utf-8")
        secret.chmod(0o600)
        environ = {"CREW_PASSWORD_FILE": str(secret)}
    settings = BrokerSettings.from_url(_without_password(broker_url), environ=environ)
    assert settings.password == password
    client = Client(broker=settings)
    await client.connect(timeout=10)
    await client.close()
    assert any(":***@" in r.getMessage() for r in caplog.records)  # the URL, masked


def test_missing_password_file_is_a_clear_error(tmp_path, broker_url):
    with pytest.raises(FileNotFoundError, match="missing"):
        BrokerSettings.from_url(_without_password(broker_url),
                                environ={"CREW_PASSWORD_FILE": str(tmp_path / "missing")})
