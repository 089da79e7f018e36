"""Where the broker is and how to log in: one frozen object, built once, passed down.

Sources, strongest first: explicit arguments, the URL (argument, else ``$CREW_URL``, else
guest on localhost:5672), ``$CREW_PASSWORD``, ``$CREW_PASSWORD_FILE``, then ``guest``.
The password is never shown: :attr:`BrokerSettings.safe_url` and ``repr`` mask it.

Also the defaults and ranges of a worker's own settings, in one place for
:class:`crew.worker.Worker` and its command line alike.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from typing import Any, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pika

__all__ = ["BrokerSettings", "DEFAULT_GRACE", "DEFAULT_MAX_MEMORY", "DEFAULT_MAX_STUCK",
           "DEFAULT_URL", "MIN_MAX_MEMORY", "check_worker_limits"]

#: Without a URL: guest on localhost (the password, "guest" unless the environment says
#: otherwise, is deliberately not in it, so that $CREW_PASSWORD applies).
DEFAULT_URL = "amqp://guest@localhost:5672/"
_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
#: Seconds between heartbeats: a dead link is noticed after two or three of them. A job that
#: holds the GIL in C code longer than about two intervals can starve them (see README).
DEFAULT_HEARTBEAT = 10

#: Default number of stuck job threads a worker tolerates before it drains and exits.
DEFAULT_MAX_STUCK = 4
#: Default seconds running jobs get to finish on a graceful stop.
DEFAULT_GRACE = 30.0
#: Default memory ceiling, in bytes, of what a worker reserves for the calls it decodes and
#: runs (see crew.memory): any body of up to 16 MiB as sent, and any gzip body that inflates
#: to at most 30 MiB (27 MiB of JSON), fits it whatever it holds.
DEFAULT_MAX_MEMORY = 1024 * 1024 * 1024
#: The smallest ceiling accepted: a 16 MiB body of strings or bytes must fit.
MIN_MAX_MEMORY = 128 * 1024 * 1024


def check_worker_limits(concurrency: int, max_stuck: int, grace: float,
                        max_memory: int) -> None:
    """Raise ``ValueError`` for a worker setting out of its range."""
    if not isinstance(concurrency, int) or not 1 <= concurrency <= 1000:
        raise ValueError(f"concurrency must be an int in 1..1000, got {concurrency!r}")
    if not isinstance(max_stuck, int) or max_stuck < 0:
        raise ValueError(f"max_stuck must be an int >= 0, got {max_stuck!r}")
    if not grace >= 0:
        raise ValueError(f"grace must be >= 0 seconds, got {grace!r}")
    if not isinstance(max_memory, int) or max_memory < MIN_MAX_MEMORY:
        raise ValueError(f"max_memory must be an int of at least {MIN_MAX_MEMORY} bytes "
                         f"(128 MiB), got {max_memory!r}")


@dataclasses.dataclass(frozen=True)
class BrokerSettings:
    """Connection settings for one broker."""

    host: str = "localhost"
    port: int = 5672
    vhost: str = "/"
    user: str = "guest"
    password: str = dataclasses.field(default="guest", repr=False)
    tls: bool = False
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    heartbeat: int = DEFAULT_HEARTBEAT
    name: str = "crew"

    @classmethod
    def from_url(cls, url: str | None = None, *, environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> "BrokerSettings":
        """Build settings from an amqp:// or amqps:// URL plus overrides (None = not given)."""
        env = os.environ if environ is None else environ
        parsed = _parse_url(url or env.get("CREW_URL") or DEFAULT_URL)
        port_given = parsed.pop("port_given")
        if "password" not in parsed:
            password = _password_from_env(env)
            if password is not None:
                parsed["password"] = password
        parsed.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("tls") and overrides.get("port") is None and not port_given:
            parsed["port"] = _DEFAULT_PORTS["amqps"]
        return cls(**parsed)

    @property
    def safe_url(self) -> str:
        """The URL with the password masked, for logs and error messages."""
        scheme = "amqps" if self.tls else "amqp"
        vhost = quote(self.vhost, safe="")
        return f"{scheme}://{quote(self.user, safe='')}:***@{self.host}:{self.port}/{vhost}"

    def pika_parameters(self) -> pika.ConnectionParameters:
        """pika's connection parameters for these settings."""
        return pika.ConnectionParameters(
            host=self.host, port=self.port, virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user, self.password),
            heartbeat=self.heartbeat,
            ssl_options=pika.SSLOptions(self.ssl_context(), self.host) if self.tls else None,
            # A publish blocked by a memory or disk alarm fails after this long instead of
            # hanging; the callers' own deadlines are usually shorter.
            blocked_connection_timeout=60,
            connection_attempts=1,
            socket_timeout=5,
            client_properties={"connection_name": self.name, "product": "crew"},
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context that verifies the broker's certificate unless ``verify`` is off."""
        context = ssl.create_default_context(cafile=self.cafile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context


def _password_from_env(env: Mapping[str, str]) -> str | None:
    if env.get("CREW_PASSWORD"):
        return env["CREW_PASSWORD"]
    path = env.get("CREW_PASSWORD_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return None


def _parse_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"broker URL must start with amqp:// or amqps://, got {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("broker URL has an invalid port") from None
    result: dict[str, Any] = {
        "host": parts.hostname or "localhost",
        "port": port or _DEFAULT_PORTS[parts.scheme],
        "port_given": port is not None,
        "tls": parts.scheme == "amqps",
        # "amqp://host/" and "amqp://host" both mean the default vhost "/".
        "vhost": unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
    }
    if parts.username:
        result["user"] = unquote(parts.username)
    if parts.password is not None:
        result["password"] = unquote(parts.password)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    for key in ("cafile", "certfile", "keyfile"):
        if key in query:
            result[key] = query.pop(key)
    if "heartbeat" in query:
        result["heartbeat"] = int(query.pop("heartbeat"))
    if "verify" in query:
        result["verify"] = query.pop("verify").lower() not in ("0", "false", "no", "none")
    if query:
        raise ValueError(f"unknown broker URL options: {', '.join(sorted(query))}")
    return result
