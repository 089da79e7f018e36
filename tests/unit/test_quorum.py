"""Quorum task queues without a broker: the queue type's sources and validation, the queue
arguments per type, and what a dead letter means to the client."""

from __future__ import annotations

import asyncio

import pytest
from pika.spec import BasicProperties

import crew
from crew import DeliveryLimitError, ExpirationError, Worker, protocol
from crew.cli import build_parser
from crew.pending import Call, Pending, dead_letter_error


def test_classic_is_the_default(monkeypatch):
    monkeypatch.delenv(protocol.QUEUE_TYPE_ENV, raising=False)
    assert protocol.queue_type() == "classic"
    assert Worker({"t": lambda x: x}).queue_type == "classic"


def test_the_environment_names_the_queue_type(monkeypatch):
    monkeypatch.setenv("CREW_QUEUE_TYPE", "quorum")
    assert Worker({"t": lambda x: x}).queue_type == "quorum"
    assert Worker({"t": lambda x: x}, queue_type="classic").queue_type == "classic"


@pytest.mark.parametrize("value", ["Quorum", "stream", "", "mirrored"])
def test_other_queue_types_are_refused_with_the_accepted_values(value):
    with pytest.raises(ValueError, match="must be one of classic, quorum, not"):
        Worker({"t": lambda x: x}, queue_type=value)


def test_a_bad_environment_value_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("CREW_QUEUE_TYPE", "qourum")
    with pytest.raises(ValueError, match=r"one of classic, quorum, not 'qourum' \(from \$CREW"):
        Worker({"t": lambda x: x})


def test_a_queue_type_must_be_a_string():
    with pytest.raises(TypeError):
        protocol.queue_type(1)


def test_the_command_line_takes_the_queue_type():
    assert build_parser().parse_args(["--queue-type", "quorum"]).queue_type == "quorum"
    assert build_parser().parse_args([]).queue_type is None  # then $CREW_QUEUE_TYPE
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--queue-type", "stream"])


def test_queue_arguments_per_type():
    assert protocol.task_queue_arguments(10) == {
        "x-max-priority": 10, "x-dead-letter-exchange": "crew.expired",
        "x-queue-type": "classic"}
    assert protocol.task_queue_arguments(10, "quorum") == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": "crew.expired",
        "x-delivery-limit": protocol.DELIVERY_LIMIT}


def _death(reason):
    return {"x-death": [{"count": 1, "reason": reason, "queue": "crew.tasks.t"}],
            "x-first-death-reason": reason, "crew-client": "amq.gen-x"}


def test_a_dead_letter_for_the_delivery_limit_is_a_delivery_limit_error():
    error = dead_letter_error("t", _death("delivery_limit"))
    assert isinstance(error, DeliveryLimitError) and isinstance(error, crew.CallError)
    assert error.deliveries == protocol.DELIVERY_LIMIT + 1 == 6
    assert error.task == "t"
    assert "'t' was delivered 6 times" in str(error)


@pytest.mark.parametrize("headers", [_death("expired"), _death(b"expired"), None, {},
                                     {"x-death": "nonsense"}, {"x-death": [1]},
                                     {"x-death": 5}, {"x-death": {"0": 1}}])
def test_any_other_dead_letter_is_an_expiration(headers):
    assert isinstance(dead_letter_error("t", headers), ExpirationError)


def test_a_bytes_reason_is_read():
    assert protocol.dead_letter(_death(b"delivery_limit")) == ("delivery_limit", "t")


@pytest.mark.parametrize("headers", [
    None, {}, {"x-death": 5}, {"x-death": "nonsense"}, {"x-death": {"reason": "expired"}},
    {"x-death": []}, {"x-death": [1]}, {"x-death": [{"reason": 7, "queue": ["crew.tasks.t"]}]},
    {"x-death": [{"reason": "expired", "queue": "someone.elses"}]}])
def test_a_dead_letter_not_in_the_brokers_shape_says_nothing(headers):
    # Anyone allowed to publish to crew.expired reaches the dashboard's catch-all binding.
    reason, task = protocol.dead_letter(headers)
    assert task == "" and reason in ("", "expired")


def test_the_newest_death_says_which_task_and_why():
    headers = {"x-death": [{"reason": b"expired", "queue": b"crew.tasks.a.b"},
                           {"reason": "delivery_limit", "queue": "crew.tasks.older"}]}
    assert protocol.dead_letter(headers) == ("expired", "a.b")


def test_the_pending_call_is_settled_by_a_delivery_limit_dead_letter():
    loop = asyncio.new_event_loop()
    try:
        pending = Pending()
        call = Call("t", loop.create_future(), 0)
        pending.calls["c1"] = call
        props = BasicProperties(correlation_id="c1", headers=_death("delivery_limit"))
        pending.on_reply(protocol.EXPIRED_EXCHANGE, props, b"\xc0")
        assert isinstance(call.future.exception(), DeliveryLimitError)
    finally:
        loop.close()
