"""Names, arguments and unit conversions of the wire protocol, without a broker."""

from __future__ import annotations

import time

import pytest

from crew import protocol

# --- names and units ------------------------------------------------------------------

def test_task_queue_name():
    assert protocol.task_queue("stat") == "crew.tasks.stat"
    # The longest task name still makes a legal AMQP queue name (at most 255 bytes).
    assert len(protocol.task_queue("x" * 200).encode()) <= 255


def test_max_expiration_stays_under_the_default_consumer_timeout():
    assert protocol.MAX_EXPIRATION < 30 * 60
    assert 0 < protocol.DEFAULT_EXPIRATION <= protocol.MAX_EXPIRATION


@pytest.mark.parametrize("seconds, ms", [(1, 1000), (0.25, 250), (0.0001, 1), (0, 1),
                                         (1500, 1_500_000)])
def test_seconds_to_ms(seconds, ms):
    assert protocol.seconds_to_ms(seconds) == ms


def test_now_ms_is_wall_clock_epoch_milliseconds():
    before = int(time.time() * 1000)
    now = protocol.now_ms()
    after = int(time.time() * 1000)
    assert isinstance(now, int)
    assert before - 1 <= now <= after + 1


def test_ttl_property_is_the_time_left_as_a_string_of_ms():
    ttl = protocol.ttl_property(protocol.now_ms() + 5000)
    assert isinstance(ttl, str) and ttl.isdigit()
    assert 4900 <= int(ttl) <= 5000


@pytest.mark.parametrize("offset_ms", [0, -1, -60_000])
def test_ttl_property_is_never_below_one(offset_ms):
    # "0" would make the broker drop a call that is not delivered at once, and a negative
    # value closes the channel.
    assert protocol.ttl_property(protocol.now_ms() + offset_ms) == "1"


# --- headers ---------------------------------------------------------------------------

def test_user_headers_strip_crew_and_broker_headers():
    headers = {
        "crew-deadline": 1, "crew-client": "q", "crew-task": "t", "crew-status": "ok",
        "crew-gzip": False, "x-death": [], "x-first-death-reason": "expired",
        "x-last-death-queue": "q", "x-delivery-count": 2, "x-received-from": [],
        "x-stream-offset": 7, "x-opt-anything": 1, "CC": ["crew.tasks.other"], "BCC": [],
        "trace": "abc", "Crew-Case": 1, "xylophone": 2, "mycrew-": 3,
        "x-request-id": "r1", "x-tenant": "t1", "x-answer": 42, "cc": "lower case is mine",
    }
    assert protocol.user_headers(headers) == {
        "trace": "abc", "Crew-Case": 1, "xylophone": 2, "mycrew-": 3, "x-request-id": "r1",
        "x-tenant": "t1", "x-answer": 42, "cc": "lower case is mine"}


@pytest.mark.parametrize("headers", [None, {}])
def test_user_headers_of_nothing(headers):
    assert protocol.user_headers(headers) == {}


def test_reserved_prefix_matches_every_crew_header():
    for header in (protocol.DEADLINE_HEADER, protocol.CLIENT_HEADER, protocol.TASK_HEADER,
                   protocol.STATUS_HEADER):
        assert header.startswith(protocol.HEADER_PREFIX)


# --- queue arguments and bindings ------------------------------------------------------

def test_task_queue_arguments():
    assert protocol.task_queue_arguments(7) == {
        "x-max-priority": 7,
        "x-dead-letter-exchange": "crew.expired",
        "x-queue-type": "classic",
    }


def test_task_queue_arguments_are_a_fresh_dict_each_time():
    first = protocol.task_queue_arguments(10)
    first["x-max-priority"] = 99
    assert protocol.task_queue_arguments(10)["x-max-priority"] == 10


def test_expired_binding_routes_on_the_client_header():
    assert protocol.expired_binding("amq.gen-abc") == {"x-match": "all",
                                                       "crew-client": "amq.gen-abc"}


def test_names_documented_in_protocol_md():
    # docs/PROTOCOL.md spells these out for other languages; a rename must change both.
    assert (protocol.TASK_QUEUE_PREFIX, protocol.EXPIRED_EXCHANGE, protocol.CONTROL_EXCHANGE,
            protocol.PUBSUB_EXCHANGE) == ("crew.tasks.", "crew.expired", "crew.control",
                                          "crew.pubsub")
    assert (protocol.DEADLINE_HEADER, protocol.CLIENT_HEADER, protocol.TASK_HEADER,
            protocol.STATUS_HEADER) == ("crew-deadline", "crew-client", "crew-task",
                                        "crew-status")
    assert protocol.STATUSES == {"ok", "error", "timeout", "expired"}
    assert protocol.CANCEL_TYPE == "crew.cancel"
    assert (protocol.MSGPACK, protocol.JSON, protocol.GZIP) == (
        "application/msgpack", "application/json", "gzip")
    assert (protocol.MAX_BODY_BYTES, protocol.MAX_DECOMPRESSED_BYTES,
            protocol.GZIP_THRESHOLD) == (16 * 2**20, 64 * 2**20, 64 * 2**10)
    assert (protocol.DEFAULT_EXPIRATION, protocol.MAX_EXPIRATION,
            protocol.DEFAULT_QUEUE_MAX_PRIORITY) == (60.0, 1500.0, 10)

