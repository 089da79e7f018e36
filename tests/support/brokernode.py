"""A private RabbitMQ node for tests: its own name, ports, home, database, logs and config.

Shared by the fault harness (``tests/support/faults.py``) and the TLS tests
(``tests/nodes/test_tls.py``).
:class:`PrivateNode` writes the node's files in a directory of its own (a temporary one,
made by the caller), runs the real ``rabbitmq-server`` script in a session of its own with
an environment that keeps everything from ``/etc/rabbitmq`` and the shared node out, waits
until it is ready, runs ``rabbitmqctl`` against it, and stops or kills it. The shared
broker on 127.0.0.1:5672 is never touched: a private node has another name, other ports,
and an Erlang cookie of its own.

Not for production use: the node runs with test-only settings (``guest`` on loopback).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

#: Seconds a node may take to boot, unless told otherwise (it usually answers after about 7).
BOOT_TIMEOUT = 60.0


def rabbitmq_sbin(*preferred: str | None) -> Path | None:
    """The directory of the real rabbitmq-server script: ``preferred`` folders first (None
    ones skipped), then /usr/lib/rabbitmq/bin, then the one on $PATH. Debian's /usr/sbin
    script is a wrapper that switches to the rabbitmq user and drops the environment that
    makes a node private, so it is passed over."""
    candidates = [*preferred, "/usr/lib/rabbitmq/bin"]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(os.path.dirname(found))
    for folder in filter(None, candidates):
        script = Path(folder) / "rabbitmq-server"
        if script.exists() and "script-wrapper" not in os.path.realpath(script):
            return Path(folder)
    return None


class NodeStartError(RuntimeError):
    """A private node did not come up."""


class PrivateNode:
    """A RabbitMQ node of its own in ``base`` (an empty directory, made by the caller).

    ``conf``: lines added to its rabbitmq.conf (after the plain AMQP listener on
    127.0.0.1:``amqp_port``); ``advanced``: the text of its advanced.config.
    """

    def __init__(self, base: Path, sbin: Path, name: str, amqp_port: int, dist_port: int,
                 conf: Iterable[str] = (), advanced: str = "[].\n") -> None:
        self.base = base
        self.sbin = sbin
        self.name = name
        self.port = amqp_port
        self.dist_port = dist_port
        self.url = f"amqp://guest:guest@127.0.0.1:{amqp_port}/"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid_file = base / "node.pid"
        self.log_dir = base / "log"
        self.server_out = base / "server.out"
        self.starts = 0
        for sub in ("home", "mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        # The cookie is written before anything starts: rabbitmq-server and the first
        # rabbitmqctl would otherwise race to create it, each with a value of its own.
        cookie = base / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("# private node: nothing from /etc\n")
        (base / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.local = 127.0.0.1:{amqp_port}",
            *conf,
            "loopback_users.guest = true",
            "log.file.level = info",
            "log.console = false",
        ]) + "\n")
        (base / "advanced.config").write_text(advanced)
        self.env = dict(os.environ)
        self.env.update({
            "HOME": str(base / "home"),
            # Debian's /etc/rabbitmq/rabbitmq-env.conf names the shared node: not ours.
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        self.env.pop("ERL_FLAGS", None)

    # lifecycle

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Start the node and return once it speaks AMQP (:meth:`launch`, :meth:`wait_ready`)."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the node in a session of its own, without waiting for it (so that several
        nodes can boot at once)."""
        if self.running:
            raise RuntimeError(f"the private node {self.name} is already running")
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        out = open(self.server_out, "ab")
        try:
            # A session (and process group) of its own, like `setsid rabbitmq-server`: the
            # process is held here (not -detached), and kill9() reaches every process in it.
            self.process = subprocess.Popen([str(self.sbin / "rabbitmq-server")], env=self.env,
                                            cwd=self.base, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()
        self.starts += 1

    def wait_ready(self, timeout: float) -> None:
        """Return once the launched node has booted and answers AMQP; raise
        :class:`NodeStartError` (the node killed) if it does not within ``timeout``."""
        deadline = time.monotonic() + timeout
        self._await_boot(deadline)
        self._await_amqp(deadline)

    def _await_boot(self, deadline: float) -> None:
        """``rabbitmqctl wait`` (pid file, then the rabbit app), racing the server's exit."""
        waiter = subprocess.Popen(
            [str(self.sbin / "rabbitmqctl"), "-n", self.name, "wait", str(self.pid_file),
             "--timeout", str(int(deadline - time.monotonic()))],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.process is not None
        try:
            _wait_first_exit([waiter, self.process], deadline - time.monotonic())
        finally:
            if waiter.poll() is None:
                waiter.kill()
            output = waiter.communicate()[0].decode(errors="replace")
        if self.process.poll() is not None:
            raise NodeStartError(f"rabbitmq-server ({self.name}) exited with "
                                 f"{self.process.returncode} while booting\n{self.log_tail()}")
        if waiter.returncode != 0:
            self.kill9()
            raise NodeStartError(f"the private node {self.name} did not boot within the time "
                                 f"allowed (rabbitmqctl wait: {output.strip()[-500:]})\n"
                                 f"{self.log_tail()}")

    def _await_amqp(self, deadline: float) -> None:
        """Check the listener: it must answer the AMQP 0-9-1 header with Connection.Start."""
        try:
            with socket.create_connection(("127.0.0.1", self.port),
                                          timeout=max(1.0, deadline - time.monotonic())) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                frame = s.recv(7)
        except OSError as exc:
            raise NodeStartError(f"the private node {self.name} booted but port {self.port} "
                                 f"does not answer: {exc}\n{self.log_tail()}") from None
        if not frame.startswith(b"\x01\x00\x00"):
            raise NodeStartError(f"port {self.port} did not answer like AMQP: {frame!r}")

    def kill9(self) -> None:
        """SIGKILL every process of the node's session, as a crash would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self._kill_strays()

    def stop(self) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``), else kill it."""
        if not self.running:
            self._kill_strays()
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.ctl("stop", str(self.pid_file), timeout=60)
        assert self.process is not None
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self.kill9()

    def _kill_strays(self) -> None:
        """Helpers the VM started in sessions of their own (erl_child_setup, inet_gethost,
        the disk monitor) exit when the VM dies; kill any that outlived it (found by this
        node's directory in their environment)."""
        marker = str(self.base).encode()
        for pid in pids_with_environ_containing(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    # rabbitmqctl

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n NODE -q ARGS``; its output, or raise RuntimeError with it."""
        done = subprocess.run([str(self.sbin / "rabbitmqctl"), "-n", self.name, "-q", *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-800:]}")
        return done.stdout

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in [self.server_out, *sorted(self.log_dir.glob("*.log"))]:
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts) or "(no log)"


def _wait_first_exit(processes: list[subprocess.Popen[Any]], timeout: float) -> None:
    """Block until one of ``processes`` exits or ``timeout`` passes (pidfds, no polling)."""
    sel = selectors.DefaultSelector()
    fds = []
    try:
        for p in processes:
            if p.poll() is not None:
                return
            fd = os.pidfd_open(p.pid)
            fds.append(fd)
            sel.register(fd, selectors.EVENT_READ)
        sel.select(max(0.0, timeout))
    finally:
        sel.close()
        for fd in fds:
            os.close(fd)


def pids_with_environ_containing(marker: bytes) -> list[int]:
    """The processes (but this one) whose environment contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read():
                    found.append(int(entry))
    return found


__all__ = ["BOOT_TIMEOUT", "NodeStartError", "PrivateNode", "pids_with_environ_containing",
           "rabbitmq_sbin"]
