"""Where the broker is and how to log in: one frozen object, built once, passed down.

Sources, strongest first: explicit arguments, the URL (argument, else ``$CREW_URL``, else
guest on localhost:5672), ``$CREW_PASSWORD``, ``$CREW_PASSWORD_FILE``, then ``guest``.
The password is never shown: :attr:`BrokerSettings.safe_url` and ``repr`` mask it.

Several URLs (a list, or one string with commas) name the nodes of one cluster: they must
agree on everything but host and port (scheme, vhost, user, password, options), and
:attr:`BrokerSettings.nodes` holds their addresses; :meth:`BrokerSettings.node` gives the
settings of one node, which is what a connection attempt uses.

Also the defaults and ranges of a worker's own settings, in one place for
:class:`crew.worker.Worker` and its command line alike.
"""

from __future__ import annotations

import dataclasses
import os
import re
import ssl
from typing import Any, Mapping, Sequence
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pika

__all__ = ["BrokerSettings", "BrokerSpec", "DEFAULT_GRACE", "DEFAULT_MAX_MEMORY",
           "DEFAULT_MAX_STUCK", "DEFAULT_URL", "MIN_MAX_MEMORY", "check_worker_limits",
           "split_urls"]

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
    """Connection settings for one broker, or for the nodes of one cluster.

    ``nodes``: every node as ``(host, port)``, in the order given, each once; ``host`` and
    ``port`` are the node a connection uses (the first one, unless made by :meth:`node`).
    With fewer than two nodes given, ``host`` and ``port`` are the only node.
    """

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
    nodes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if len(self.nodes) < 2:
            object.__setattr__(self, "nodes", ((self.host, self.port),))
        elif (self.host, self.port) not in self.nodes:
            raise ValueError(f"host and port ({self.host}:{self.port}) must be one of the "
                             f"nodes ({_addresses(self.nodes)})")

    @classmethod
    def from_url(cls, url: str | Sequence[str] | None = None, *,
                 environ: Mapping[str, str] | None = None, **overrides: Any) -> "BrokerSettings":
        """Build settings from amqp:// or amqps:// URLs plus overrides (None = not given).

        ``url``: one URL, several separated by commas, or a list of them (the nodes of one
        cluster). ``host`` and ``port`` overrides are refused with several URLs; the others
        (``vhost``, ``user``, ``password``, ``tls``...) apply to every node.
        """
        env = os.environ if environ is None else environ
        urls = split_urls(url or env.get("CREW_URL") or DEFAULT_URL)
        parsed = [_parse_url(one) for one in urls]
        given = {k: v for k, v in overrides.items() if v is not None}
        if len(parsed) > 1 and given.keys() & {"host", "port"}:
            raise ValueError("a host or port override picks one node: with several broker "
                             "URLs, give each node's host and port in its URL")
        shared = _shared(parsed)
        if "password" not in shared:
            password = _password_from_env(env)
            if password is not None:
                shared["password"] = password
        shared.update(given)
        moved = bool(overrides.get("tls")) and "port" not in given  # tls=True: amqps's port
        nodes = tuple(dict.fromkeys(
            (given.get("host", p["host"]),
             _DEFAULT_PORTS["amqps"] if moved and not p["port_given"]
             else given.get("port", p["port"])) for p in parsed))
        shared["host"], shared["port"] = nodes[0]
        return cls(**shared, nodes=nodes)

    @classmethod
    def given(cls, broker: "BrokerSpec") -> "BrokerSettings":
        """``broker`` if it is settings already, else settings from its URL(s)."""
        return broker if isinstance(broker, BrokerSettings) else cls.from_url(broker)

    def node(self, index: int) -> "BrokerSettings":
        """The settings of node ``index`` (modulo their number): where a connection goes."""
        host, port = self.nodes[index % len(self.nodes)]
        if (host, port) == (self.host, self.port):
            return self
        return dataclasses.replace(self, host=host, port=port)

    @property
    def safe_url(self) -> str:
        """The URL (of the node in use) with the password masked, for logs and errors."""
        return self._safe_url(self.host, self.port)

    @property
    def safe_urls(self) -> str:
        """Every node's URL, comma-separated, with the password masked."""
        return ",".join(self._safe_url(host, port) for host, port in self.nodes)

    def _safe_url(self, host: str, port: int) -> str:
        scheme = "amqps" if self.tls else "amqp"
        vhost = quote(self.vhost, safe="")
        return f"{scheme}://{quote(self.user, safe='')}:***@{host}:{port}/{vhost}"

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


#: What a worker or client takes as its broker: settings, a URL, several URLs separated by
#: commas, a list of URLs, or None (``$CREW_URL``, else the default).
BrokerSpec = BrokerSettings | str | Sequence[str] | None


def _password_from_env(env: Mapping[str, str]) -> str | None:
    if env.get("CREW_PASSWORD"):
        return env["CREW_PASSWORD"]
    path = env.get("CREW_PASSWORD_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return None


#: Where a list of URLs splits: a comma (and spaces) before the next URL's scheme. A comma
#: inside a URL (a password may hold one unencoded) splits nothing.
_NEXT_URL = re.compile(r"\s*,\s*(?=amqps?://)", re.IGNORECASE)


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The URLs in ``urls``: a list of them, or one string with commas between them."""
    pieces = _NEXT_URL.split(urls.strip()) if isinstance(urls, str) else list(urls)
    if not pieces or not all(isinstance(p, str) and p.strip() for p in pieces):
        raise ValueError("broker URLs must be non-empty strings, separated by commas")
    return [piece.strip() for piece in pieces]


#: What every node's URL must agree on: all but the address.
_SHARED = ("tls", "vhost", "user", "password", "cafile", "certfile", "keyfile", "heartbeat",
           "verify")


def _shared(parsed: list[dict[str, Any]]) -> dict[str, Any]:
    """What the URLs give besides host and port, checked to be the same in every one."""
    first = {k: v for k, v in parsed[0].items() if k in _SHARED}
    for number, other in enumerate(parsed[1:], 2):
        for key in _SHARED:
            # No user in a URL means guest; no password means the environment's, which
            # differs from one given in a URL.
            default = _default(key)
            if other.get(key, default) != first.get(key, default):
                raise ValueError(f"the broker URLs disagree on the {_what(key)}: "
                                 f"{_difference(key, first, other, number)}; the nodes of "
                                 "one cluster share them")
    return first


def _default(key: str) -> Any:
    """What a URL without ``key`` means (not the password: that comes from elsewhere)."""
    return {"user": "guest", "heartbeat": DEFAULT_HEARTBEAT, "verify": True}.get(key)


def _what(key: str) -> str:
    return {"tls": "scheme (amqp or amqps)", "vhost": "virtual host"}.get(key, key)


def _difference(key: str, first: dict[str, Any], other: dict[str, Any], number: int) -> str:
    """How URL ``number`` differs from URL 1 on ``key``; a password is never shown."""
    if key == "password":
        if "password" in first and "password" in other:
            return f"URL {number} gives another one than URL 1"
        return f"URL 1 gives {'one' if 'password' in first else 'none'}, URL {number} " \
               f"{'one' if 'password' in other else 'none'}"
    return f"URL 1 {_shown(key, first)}, URL {number} {_shown(key, other)}"


def _shown(key: str, parsed: dict[str, Any]) -> str:
    if key == "tls":
        return "amqps" if parsed["tls"] else "amqp"
    if key in parsed:
        return repr(parsed[key])
    return f"none (default {_default(key)!r})"


def _addresses(nodes: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{host}:{port}" for host, port in nodes)


def _parse_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"broker URL must start with amqp:// or amqps://, got {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("broker URL has an invalid port") from None
    if parts.hostname and "," in parts.hostname:
        raise ValueError("several broker URLs must each start with amqp:// or amqps://, "
                         "separated by commas")
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
