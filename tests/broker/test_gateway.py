"""The HTTP gateway (crew.gateway), driven over HTTP against real workers and the broker."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

import pika
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.tcpclient import TCPClient
from tornado.testing import bind_unused_port

import worker_example
from crew import JobKilled, gateway
from crew.worker import Worker, context, serve_in_thread
from tests.support.processes import until

MAX_BODY = 1024


@pytest.fixture
def poll_timeout() -> float:
    return 10.0


@pytest.fixture
def app(client, poll_timeout):
    return gateway.make_app(client, max_body=MAX_BODY, poll_timeout=poll_timeout,
                            keepalive=0.2)


async def listeners(app: Any, channel: str, count: int) -> None:
    """Wait until ``count`` requests listen on ``channel`` (their bindings in place)."""
    listening = app.settings["listening"]
    await until(lambda: listening.counts[channel] == count, listening.changed)


async def post(http_client, url: str, body: Any = None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    return await http_client.fetch(url, method="POST", body=data, raise_error=False)


def json_of(response) -> Any:
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.body)


async def open_raw(port: int, request: str) -> IOStream:
    """An HTTP/1.0 request on a plain socket: the test reads and closes it when it likes."""
    stream = await TCPClient().connect("127.0.0.1", port)
    await stream.write(request.encode())
    return stream


def failing(_data: Any) -> None:
    return 1 / 0


# --- calls ----------------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_call_answers_the_result_as_json(make_worker, http_client, base_url, uid):
    make_worker({f"echo.{uid}": lambda data: {"got": data}})
    response = await post(http_client, f"{base_url}/call/echo.{uid}?priority=5&expiration=10",
                          {"a": [1, "é"]})
    assert response.code == 200
    assert json_of(response) == {"got": {"a": [1, "é"]}}
    empty = await post(http_client, f"{base_url}/call/echo.{uid}", raw=b"")
    assert json_of(empty) == {"got": None}


@pytest.mark.gen_test(timeout=30)
async def test_the_example_tasks_over_the_gateway(make_worker, http_client, base_url):
    worker = make_worker(worker_example.tasks, settings=worker_example.settings)
    assert json_of(await post(http_client, f"{base_url}/call/test")) == "Wake up Neo.\n"
    assert json_of(await post(http_client, f"{base_url}/call/stat")) == (
        f'I\'m worker "{worker.uuid}". And I serve 2 tasks')
    slept = json_of(await post(http_client, f"{base_url}/call/sleep", 0.1))
    assert 0.1 <= slept < 5


@pytest.mark.gen_test(timeout=30)
async def test_errors_map_to_statuses(make_worker, http_client, base_url, uid):
    make_worker({f"fail.{uid}": failing, f"bytes.{uid}": lambda _: {b"key": 1}})
    cases = [
        (f"/call/nothing-serves-this.{uid}", b"null", 404, "UnknownTaskError"),
        (f"/call/fail.{uid}", b"null", 502, "RemoteError"),
        (f"/call/bytes.{uid}", b"null", 502, "EncodeError"),
        (f"/call/fail.{uid}", b"{not json", 400, "BadJSON"),
        (f"/call/fail.{uid}", b"123456789012345678901234567890", 400, "EncodeError"),
        (f"/call/fail.{uid}?priority=high", b"null", 400, "BadRequest"),
        (f"/call/fail.{uid}?priority=256", b"null", 400, "BadRequest"),
        (f"/call/fail.{uid}?expiration=-1", b"null", 400, "BadRequest"),
        (f"/call/fail.{uid}?expiration=nan", b"null", 400, "BadRequest"),
        ("/call/has%20space", b"null", 400, "BadRequest"),
        ("/nowhere", b"null", 404, "NotFound"),
    ]
    for path, body, status, error in cases:
        response = await post(http_client, base_url + path, raw=body)
        assert (path, response.code, json_of(response)["error"]) == (path, status, error)
    remote = json_of(await post(http_client, f"{base_url}/call/fail.{uid}"))
    assert remote == {"error": "RemoteError", "type": "ZeroDivisionError",
                      "message": "division by zero"}
    wrong_method = await http_client.fetch(f"{base_url}/call/fail.{uid}", raise_error=False)
    assert (wrong_method.code, json_of(wrong_method)["error"]) == (405, "MethodNotAllowed")


@pytest.mark.gen_test(timeout=30)
async def test_killed_at_the_deadline_is_504(make_worker, http_client, base_url):
    make_worker(worker_example.tasks, settings=worker_example.settings)
    response = await post(http_client, f"{base_url}/call/dead?expiration=1")
    assert (response.code, json_of(response)["error"]) == (504, "TimeoutError")


@pytest.mark.gen_test(timeout=30)
async def test_expired_is_503(broker_url, http_client, base_url, uid):
    # The queue exists (a worker declared it) but nobody consumes it any more.
    worker = Worker({f"idle.{uid}": lambda _: None}, broker=broker_url)
    loop = asyncio.get_running_loop()
    thread = await loop.run_in_executor(None, serve_in_thread, worker)
    worker.request_stop(grace=0)
    await loop.run_in_executor(None, thread.join, 10)
    response = await post(http_client, f"{base_url}/call/idle.{uid}?expiration=0.5")
    assert (response.code, json_of(response)["error"]) == (503, "ExpirationError")


@pytest.mark.gen_test(timeout=30)
async def test_a_body_over_the_limit_is_413(http_client, base_url, uid):
    response = await post(http_client, f"{base_url}/call/any.{uid}", raw=b"1" * (MAX_BODY + 1))
    assert (response.code, json_of(response)["error"]) == (413, "BodyTooLarge")

    async def chunks(write: Callable[[bytes], Any]) -> None:  # chunked: no Content-Length
        for _ in range(4):
            await write(b" " * (MAX_BODY // 2))

    chunked = await http_client.fetch(HTTPRequest(
        f"{base_url}/publish/any.{uid}", method="POST", body_producer=chunks),
        raise_error=False)
    assert (chunked.code, json_of(chunked)["error"]) == (413, "BodyTooLarge")


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_disconnects_cancels_its_call(make_worker, client, http_server,
                                                          http_port, uid):
    events: asyncio.Queue[str] = asyncio.Queue()
    await client.subscribe(f"progress.{uid}", events.put_nowait)

    def endless(_data: Any) -> None:
        context.pubsub.publish(f"progress.{uid}", "started")
        try:
            while True:
                pass
        except JobKilled:
            context.pubsub.publish(f"progress.{uid}", "interrupted")
            raise

    make_worker({f"endless.{uid}": endless})
    stream = await open_raw(http_port, f"POST /call/endless.{uid}?expiration=20 HTTP/1.0\r\n"
                                       "Content-Length: 4\r\n\r\nnull")
    assert await asyncio.wait_for(events.get(), 10) == "started"
    stream.close()
    # Interrupted long before its 20 s deadline: the cancellation reached the worker.
    assert await asyncio.wait_for(events.get(), 5) == "interrupted"


# --- pubsub ---------------------------------------------------------------------------

async def events(stream: IOStream, count: int) -> list[bytes]:
    """The next ``count`` events of an SSE stream, keep-alive comments left out."""
    found: list[bytes] = []
    while len(found) < count:
        event = await stream.read_until(b"\n\n")
        if event != b": keep-alive\n\n":
            found.append(event)
    return found


@pytest.mark.gen_test(timeout=30)
async def test_long_poll_with_two_subscribers(app, http_client, base_url, uid):
    channel = f"news.{uid}"
    polls = [http_client.fetch(f"{base_url}/subscribe/{channel}") for _ in range(2)]
    await listeners(app, channel, 2)
    published = await post(http_client, f"{base_url}/publish/{channel}", {"n": 1})
    assert json_of(published) == {"published": channel}
    for poll in polls:
        response = await poll
        assert (response.code, json_of(response)) == (200, {"n": 1})
    await listeners(app, channel, 0)  # each request unsubscribed when it ended


@pytest.mark.parametrize("poll_timeout", [0.3])
@pytest.mark.gen_test(timeout=30)
async def test_long_poll_without_a_message_is_204(app, http_client, base_url, uid):
    response = await http_client.fetch(f"{base_url}/subscribe/quiet.{uid}")
    assert (response.code, response.body) == (204, b"")
    await listeners(app, f"quiet.{uid}", 0)


@pytest.mark.gen_test(timeout=30)
async def test_long_poll_client_that_leaves_unsubscribes(app, http_server, http_port, uid):
    stream = await open_raw(http_port, f"GET /subscribe/gone.{uid} HTTP/1.0\r\n\r\n")
    await listeners(app, f"gone.{uid}", 1)
    stream.close()
    await listeners(app, f"gone.{uid}", 0)


@pytest.mark.gen_test(timeout=30)
async def test_server_sent_events_to_two_subscribers(app, http_client, base_url, http_port,
                                                     make_worker, uid):
    make_worker(worker_example.tasks, settings=worker_example.settings)
    channel = f"orders.{uid}"
    streams = [await open_raw(http_port, f"GET /events/{channel}.%2A HTTP/1.0\r\n\r\n")
               for _ in range(2)]
    for stream in streams:
        head = await stream.read_until(b"\r\n\r\n")
        assert b"200 OK" in head and b"Content-Type: text/event-stream" in head
        assert await stream.read_until(b"\n\n") == b": subscribed\n\n"
    await post(http_client, f"{base_url}/publish/{channel}.new", {"id": 1})
    await post(http_client, f"{base_url}/publish/{channel}.paid", "two\nlines")
    await post(http_client, f"{base_url}/publish/elsewhere.{uid}", "not for them")
    for stream in streams:
        assert await events(stream, 2) == [b'data: {"id": 1}\n\n', b'data: "two\\nlines"\n\n']
    # Quiet now: keep-alive comments every 0.2 s (the app fixture's setting).
    assert await streams[0].read_until(b"\n\n") == b": keep-alive\n\n"
    for stream in streams:
        stream.close()
    await listeners(app, f"{channel}.*", 0)


@pytest.mark.gen_test(timeout=30)
async def test_a_message_json_cannot_nest_so_deep_is_skipped_not_fatal(
        app, http_client, base_url, http_port, broker_url, uid):
    # msgpack nests 990 lists deep, deeper than json.dumps can write within the stack.
    channel = f"deep.{uid}"
    stream = await open_raw(http_port, f"GET /events/{channel} HTTP/1.0\r\n\r\n")
    await stream.read_until(b": subscribed\n\n")
    poll = http_client.fetch(f"{base_url}/subscribe/{channel}", raise_error=False)
    await listeners(app, channel, 2)
    with pika.BlockingConnection(pika.URLParameters(broker_url)) as publisher:
        publisher.channel().basic_publish(
            "crew.pubsub", channel, b"\x91" * 990 + b"\xc0",
            pika.BasicProperties(content_type="application/msgpack"))
    response = await poll
    assert (response.code, json_of(response)["error"]) == (502, "EncodeError")
    await post(http_client, f"{base_url}/publish/{channel}", "after")
    assert await events(stream, 2) == [b": a message JSON cannot carry was skipped\n\n",
                                       b'data: "after"\n\n']
    stream.close()


@pytest.mark.gen_test(timeout=30)
async def test_publish_refuses_wildcards(http_client, base_url):
    response = await post(http_client, f"{base_url}/publish/orders.%2A", 1)
    assert (response.code, json_of(response)["error"]) == (400, "BadRequest")


# --- health and logs ------------------------------------------------------------------

@pytest.mark.gen_test(timeout=30)
async def test_health(client, http_client, base_url):
    response = await http_client.fetch(f"{base_url}/health")
    assert (response.code, json_of(response)) == (200, {"broker": "up", "listeners": 0})
    await client.close()
    response = await http_client.fetch(f"{base_url}/health", raise_error=False)
    assert (response.code, json_of(response)["broker"]) == (503, "down")
    call = await post(http_client, f"{base_url}/call/anything", 1)
    assert (call.code, json_of(call)["error"]) == (503, "ConnectionLostError")


@pytest.mark.gen_test(timeout=30)
async def test_one_log_line_per_request_and_no_payload(make_worker, http_client, base_url,
                                                       uid, caplog):
    make_worker({f"echo.{uid}": lambda data: data, f"fail.{uid}": failing})
    with caplog.at_level(logging.INFO, logger="crew.gateway"):
        await post(http_client, f"{base_url}/call/echo.{uid}", "secret-payload")
        await post(http_client, f"{base_url}/call/fail.{uid}", "secret-payload")
    lines = [r.getMessage() for r in caplog.records if r.name == "crew.gateway"]
    assert len(lines) == 2
    assert lines[0].startswith(f"200 POST /call/echo.{uid} ")
    assert lines[1].startswith(f"502 POST /call/fail.{uid} ")
    assert lines[1].endswith(" RemoteError")
    assert "secret-payload" not in caplog.text


def test_make_app_refuses_bad_limits(client):
    with pytest.raises(ValueError):
        gateway.make_app(client, max_body=0)
    with pytest.raises(ValueError):
        gateway.make_app(client, poll_timeout=0)


@pytest.mark.gen_test(timeout=30)
async def test_a_call_or_publish_from_another_origin_is_refused(make_worker, http_client,
                                                                 base_url, uid):
    make_worker({f"echo.{uid}": lambda data: data})
    for path in (f"/call/echo.{uid}", f"/publish/news.{uid}"):
        refused = await http_client.fetch(f"{base_url}{path}", method="POST", body=b"1",
                                          headers={"Origin": "http://elsewhere.example"},
                                          raise_error=False)
        assert refused.code == 403 and json_of(refused)["error"] == "CrossOrigin"
    same = await http_client.fetch(f"{base_url}/call/echo.{uid}", method="POST", body=b"1",
                                   headers={"Origin": base_url}, raise_error=False)
    assert (same.code, json_of(same)) == (200, 1)


@pytest.mark.gen_test(timeout=30)
async def test_read_only_refuses_every_write_and_serves_the_rest(client, make_worker, uid):
    make_worker({f"echo.{uid}": lambda data: data})
    sock, port = bind_unused_port()
    server = HTTPServer(gateway.make_app(client, writable=False))
    server.add_sockets([sock])
    fetch = AsyncHTTPClient().fetch
    try:
        for path in (f"/call/echo.{uid}", f"/publish/news.{uid}"):
            refused = await fetch(f"http://127.0.0.1:{port}{path}", method="POST", body=b"1",
                                  raise_error=False)
            assert refused.code == 403 and json_of(refused)["error"] == "ReadOnly", path
        health = await fetch(f"http://127.0.0.1:{port}/health", raise_error=False)
        assert health.code == 200
    finally:
        server.stop()
