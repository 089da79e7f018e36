"""Where the broker is and how to log in: one frozen object, built once, passed down.

Sources, strongest first: explicit arguments, the URL (argument, else ``$CREW_URL``, else
guest on localhost:5672), ``$CREW_PASSWORD``, ``$CREW_PASSWORD_FILE``, then ``guest``.
The password is never shown: :attr:`BrokerSettings.safe_url` and ``repr`` mask it.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from typing import Any, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pika

__all__ = ["BrokerSettings", "DEFAULT_URL"]

#: Without a URL: guest on localhost (the password, "guest" unless the environment says
#: otherwise, is deliberately not in it, so that $CREW_PASSWORD applies).
DEFAULT_URL = "amqp://guest@localhost:5672/"
_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
#: Seconds between heartbeats: a dead link is noticed after two or three of them. A job that
#: holds the GIL in C code longer than about two intervals can starve them (see README).
DEFAULT_HEARTBEAT = 10


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
