"""The synchronous client, for WSGI applications (Flask, Django, gunicorn) and scripts.

::

    from crew import SyncClient
    crew_client = SyncClient()          # the arguments of crew.Client
    result = crew_client.call('test', data, priority=100, expiration=3)   # blocks
    with crew_client.parallel() as mc:
        mc.call('test')
        mc.call('stat')
    test_result, stat_result = mc.result()
    crew_client.publish('news', {'title': 'hi'})
    crew_client.subscribe('news', callback)
    crew_client.close()                 # also done at interpreter exit

A :class:`~crew.Client` runs on an event loop in a daemon thread of crew's
(``crew-sync-client``), one per process, started on the first use; any thread may call, and
calls from many threads run at once over the process's one connection. A call waits at most
its deadline plus the client's ``deadline_grace`` plus :data:`HOP_MARGIN`, whatever the
broker does. A process forked after the client was used (``gunicorn --preload``,
multiprocessing) makes its own connection on its first use and leaves the parent's alone
(:mod:`crew.loopthread`).

When not to use it: in asyncio or Tornado code. A blocking call there would stop every other
coroutine of the loop, so these methods refuse to run on a thread that runs an event loop:
use :class:`~crew.Client`. It does not work under gevent or eventlet monkey-patching either,
and says so at construction.
"""

from __future__ import annotations

import atexit
import inspect
import time
import weakref
from typing import Any, Sequence

from . import protocol, validation
from .client import DEFAULT_DEADLINE_GRACE, Client
from .exceptions import ConnectionLostError
from .loops import running_loop
from .loopthread import PerProcess, refuse_green_threads
from .pubsub import Callback
from .settings import BrokerSettings
from .synccall import ON_LOOP, call_now
from .syncruntime import (CONNECT_TIMEOUT, HOP_MARGIN, Runtime, Waiting, call_on_loop, connected,
                          publish_on_loop, subscribe_one, unsubscribe_one)

__all__ = ["SyncClient", "SyncParallel"]

#: The options of :meth:`SyncClient.call` besides the task and its data.
_CALL_OPTIONS = frozenset({"priority", "expiration", "persistent", "gzip", "headers",
                           "return_headers", "retry"})


class SyncClient:
    """:class:`~crew.Client` for code that blocks: WSGI applications, scripts, threads.

    Takes the arguments of :class:`~crew.Client` and checks them at once; connects on first
    use. ``reconnect=False``: after a lost connection, calls raise
    :class:`~crew.ConnectionLostError` until :meth:`connect` is called.
    """

    def __init__(self, url: str | Sequence[str] | None = None, *, host: str | None = None,
                 port: int | None = None, vhost: str | None = None, user: str | None = None,
                 password: str | None = None, broker: BrokerSettings | None = None,
                 content_type: str = protocol.MSGPACK,
                 expiration: float = protocol.DEFAULT_EXPIRATION,
                 deadline_grace: float = DEFAULT_DEADLINE_GRACE,
                 reconnect: bool = True, metrics: bool | None = None,
                 traces: object = None) -> None:
        refuse_green_threads("crew.SyncClient")
        if broker is None:
            broker = BrokerSettings.from_url(url, host=host, port=port, vhost=vhost, user=user,
                                             password=password, name="crew-sync-client")
        self._options: dict[str, Any] = {
            "broker": broker, "content_type": content_type, "expiration": expiration,
            "deadline_grace": deadline_grace, "reconnect": reconnect, "metrics": metrics,
            "traces": traces}
        checked = Client(**self._options)  # a bad argument raises here, not on first use
        self.broker = broker
        self.content_type = content_type
        self.expiration = checked.expiration
        self.deadline_grace = checked.deadline_grace
        self._process: PerProcess[Runtime] = PerProcess()
        self._subscriptions: list[tuple[str, Callback]] = []
        self._closed = False
        _CLIENTS.add(self)

    @property
    def connected(self) -> bool:
        """Whether this process's connection is up now."""
        runtime = self._process.get()
        return runtime is not None and runtime.client.connected

    def connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Connect now (else the first use does) and wait up to ``timeout`` seconds for it;
        :class:`~crew.ConnectionLostError` if it does not come, and the client goes on
        trying. In a forked child (gunicorn's ``post_fork``), this makes its connection and
        its subscriptions."""
        _refuse_running_loop("connect")
        runtime = self._runtime()
        runtime.run(connected(runtime.client, timeout), timeout, "the connection")

    def call(self, task: str, data: Any = None, *, priority: int = 0,
             expiration: float | None = None, persistent: bool = True,
             gzip: bool | None = None, headers: dict[str, Any] | None = None,
             return_headers: bool = False, retry: bool = False) -> Any:
        """Call ``task`` and wait for its result; :meth:`crew.Client.call` has the arguments
        and the errors. Waits at most ``expiration`` (the client's by default) plus
        ``deadline_grace`` plus :data:`HOP_MARGIN`; after that, should crew's loop thread
        not have answered, it cancels the call and raises :class:`~crew.TimeoutError`.
        A call made while no other is pending is sent from the calling thread itself
        (:mod:`crew.synccall`), with the same outcomes."""
        options = {"priority": priority, "expiration": expiration, "persistent": persistent,
                   "gzip": gzip, "headers": headers, "return_headers": return_headers,
                   "retry": retry}
        _refuse_running_loop("call")
        seconds = self._check(options)
        runtime = self._runtime()
        # From this thread when it can (one thread hop fewer), else on the loop.
        outcome = call_now(runtime.client, runtime.thread.loop, task, data, options)
        if outcome is not ON_LOOP:
            return outcome
        return self._hand_over(runtime, task, data, options, seconds).wait()

    def parallel(self) -> "SyncParallel":
        """Several calls at once: ``with client.parallel() as mc: mc.call(...); ...``, then
        ``mc.result()``."""
        return SyncParallel(self)

    def publish(self, channel: str, data: Any = None, *,
                timeout: float = CONNECT_TIMEOUT) -> None:
        """Send ``data`` to every client subscribed to ``channel`` now; waits up to
        ``timeout`` seconds for the connection (:class:`~crew.ConnectionLostError`)."""
        _refuse_running_loop("publish")
        runtime = self._runtime()
        runtime.run(publish_on_loop(runtime.client, channel, data, timeout), timeout,
                    f"publishing on {channel!r}")

    def subscribe(self, channel: str, callback: Callback, *,
                  timeout: float = CONNECT_TIMEOUT) -> None:
        """Call ``callback(data)`` for each message on ``channel`` (``*`` and ``#``
        wildcards), on crew's thread ``crew-sync-callbacks``: one callback at a time, in the
        order messages arrive. It may call this client; what it raises is logged; a slow
        one delays the next messages, not the calls. Returns once the broker delivers the
        channel to this process; after ``timeout`` seconds without a connection raises
        :class:`~crew.ConnectionLostError`, and the subscription is made when the client
        connects."""
        _refuse_running_loop("subscribe")
        validation.validate_channel(channel, pattern=True)
        if not callable(callback) or inspect.iscoroutinefunction(callback):
            raise TypeError(f"callback must be a plain function (crew.Client takes coroutine "
                            f"functions), not {callback!r}")
        with self._process.lock:
            self._subscriptions.append((channel, callback))
            runtime = self._process.get()
            if runtime is None:  # made now, with every subscription, this one included
                runtime = self._make_runtime()
                waiting = connected(runtime.client, timeout)
            else:
                waiting = subscribe_one(runtime.client, channel, runtime.handoff(callback),
                                        timeout)
        runtime.run(waiting, timeout, f"subscribing to {channel!r}")

    def unsubscribe(self, channel: str, callback: Callback | None = None) -> None:
        """Remove ``callback`` (None: every callback) from ``channel``."""
        _refuse_running_loop("unsubscribe")
        with self._process.lock:
            self._subscriptions = [(name, known) for name, known in self._subscriptions
                                   if name != channel or callback not in (None, known)]
            runtime = self._process.get()
            if runtime is None:
                return
            handoff = None if callback is None else runtime.handoff(callback)
            waiting = unsubscribe_one(runtime.client, channel, handoff)
        runtime.run(waiting, CONNECT_TIMEOUT, f"unsubscribing {channel!r}")

    def close(self, timeout: float = 5.0) -> None:
        """Fail this process's pending calls with :class:`~crew.ConnectionLostError`, close
        its connection and stop crew's threads, within about ``timeout`` seconds. Calls made
        afterwards raise :class:`~crew.ConnectionLostError`. Run at interpreter exit too."""
        with self._process.lock:
            self._closed = True
            runtime = self._process.pop()
        if runtime is not None:
            runtime.close(timeout)

    # --- internals ---------------------------------------------------------------------

    def _runtime(self) -> "Runtime":
        """This process's runtime, made on first use."""
        runtime = self._process.get()
        if runtime is not None:
            return runtime
        with self._process.lock:
            return self._process.get() or self._make_runtime()

    def _make_runtime(self) -> "Runtime":
        """Start this process's loop thread and connection (holding the lock)."""
        if self._closed:
            raise ConnectionLostError("the client was closed")
        refuse_green_threads("crew.SyncClient")  # a gevent worker patches after a fork
        runtime = Runtime(Client(**self._options), self._subscriptions)
        self._process.set(runtime)
        return runtime

    def _start(self, task: str, data: Any, options: dict[str, Any]) -> "Waiting":
        """Hand a call to the loop thread; what its caller waits on."""
        _refuse_running_loop("call")
        seconds = self._check(options)
        return self._hand_over(self._runtime(), task, data, options, seconds)

    def _check(self, options: dict[str, Any]) -> float:
        """Refuse unknown options and a bad expiration (set in ``options``: the seconds)."""
        unknown = options.keys() - _CALL_OPTIONS
        if unknown:
            raise TypeError(f"call() got unexpected keyword argument(s) {sorted(unknown)}")
        expiration = options.get("expiration")
        options["expiration"] = seconds = validation.validate_expiration(
            self.expiration if expiration is None else expiration)
        if options.get("headers") is not None:  # the caller may change its dict meanwhile
            options["headers"] = dict(options["headers"])
        return seconds

    def _hand_over(self, runtime: Runtime, task: str, data: Any, options: dict[str, Any],
                   seconds: float) -> "Waiting":
        limit = time.monotonic() + seconds + self.deadline_grace + HOP_MARGIN
        work = runtime.thread.submit(call_on_loop(runtime.client, task, data, options))
        return Waiting(work, limit, f"task {task!r}")


class SyncParallel:
    """Several calls made at once; :meth:`result` returns their outcomes in call order, a
    failed call's exception object in its slot.

    Each :meth:`call` starts at once. Leaving the ``with`` block leaves the calls running,
    so :meth:`result` may come after it; leaving it by an exception cancels them.
    """

    def __init__(self, client: SyncClient) -> None:
        self._client = client
        self._calls: list[Waiting] = []

    def call(self, task: str, data: Any = None, **options: Any) -> None:
        """Start a call (the arguments of :meth:`SyncClient.call`)."""
        self._calls.append(self._client._start(task, data, options))

    def result(self) -> list[Any]:
        """Wait for every call; their results or exceptions, in call order."""
        outcomes: list[Any] = []
        for started in self._calls:
            try:
                outcomes.append(started.wait())
            except Exception as exc:  # noqa: BLE001 - a failed call's error is its outcome
                outcomes.append(exc)
        return outcomes

    def __enter__(self) -> "SyncParallel":
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is not None:
            for started in self._calls:
                started.work.cancel()


def _refuse_running_loop(method: str) -> None:
    if running_loop() is not None:
        raise RuntimeError(
            f"SyncClient.{method}() blocks its thread, and this thread runs an asyncio event "
            "loop (asyncio, Tornado, an async view): it would stop every coroutine of that "
            f"loop. Use crew.Client there: await client.{method}(...).")


#: Every client not yet collected, closed at interpreter exit.
_CLIENTS: "weakref.WeakSet[SyncClient]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for client in list(_CLIENTS):
        client.close()
