"""Names, validation and unit conversions of the wire protocol, without a broker."""

from __future__ import annotations

import time

import pytest

from crew import protocol

# --- task names ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "test", "stat.v2", "mail:send", "é" * 100, "x" * 200,
                                  "crew-ish_name/with-punctuation"])
def test_task_names_that_are_accepted(name):
    assert protocol.validate_task_name(name) == name


@pytest.mark.parametrize("name, message", [
    ("", "1 to 200 bytes"),
    ("x" * 201, "1 to 200 bytes"),
    ("é" * 101, "1 to 200 bytes"),  # 101 characters, 202 bytes
    ("two words", "spaces or control"),
    ("tab\there", "spaces or control"),
    ("line\nbreak", "spaces or control"),
    ("nul\x00", "spaces or control"),
    ("bell\x07", "spaces or control"),
])
def test_task_names_that_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        protocol.validate_task_name(name)


@pytest.mark.parametrize("name", [None, 1, b"bytes", ["x"]])
def test_task_name_must_be_a_str(name):
    with pytest.raises(TypeError, match="task name must be a str"):
        protocol.validate_task_name(name)


def test_task_queue_name():
    assert protocol.task_queue("stat") == "crew.tasks.stat"
    # The longest task name still makes a legal AMQP queue name (at most 255 bytes).
    assert len(protocol.task_queue("x" * 200).encode()) <= 255


# --- priorities ------------------------------------------------------------------------

@pytest.mark.parametrize("priority", [0, 1, 10, 255])
def test_priorities_in_range(priority):
    assert protocol.validate_priority(priority) == priority


@pytest.mark.parametrize("priority", [-1, 256, 1000])
def test_priorities_out_of_range(priority):
    with pytest.raises(ValueError, match=r"priority must be in 0\.\.255, got " + str(priority)):
        protocol.validate_priority(priority)


@pytest.mark.parametrize("priority", [True, 1.0, "1", None])
def test_priority_must_be_an_int(priority):
    with pytest.raises(TypeError, match="priority must be an int"):
        protocol.validate_priority(priority)


@pytest.mark.parametrize("value", [1, 10, 255])
def test_max_priority_in_range(value):
    assert protocol.validate_max_priority(value) == value


@pytest.mark.parametrize("value", [0, -1, 256])
def test_max_priority_out_of_range(value):
    with pytest.raises(ValueError, match=r"max_priority must be in 1\.\.255"):
        protocol.validate_max_priority(value)


@pytest.mark.parametrize("value", [False, 10.0, "10"])
def test_max_priority_must_be_an_int(value):
    with pytest.raises(TypeError, match="max_priority must be an int"):
        protocol.validate_max_priority(value)


# --- expirations and deadlines ---------------------------------------------------------

@pytest.mark.parametrize("seconds", [0.001, 1, 60, 60.5, protocol.MAX_EXPIRATION])
def test_expirations_in_range(seconds):
    assert protocol.validate_expiration(seconds) == float(seconds)
    assert isinstance(protocol.validate_expiration(seconds), float)


@pytest.mark.parametrize("seconds", [0, -1, protocol.MAX_EXPIRATION + 0.001, float("inf"),
                                     float("nan")])
def test_expirations_out_of_range(seconds):
    with pytest.raises(ValueError, match="more than 0 and at most 1500 seconds"):
        protocol.validate_expiration(seconds)


@pytest.mark.parametrize("seconds", [True, "60", None])
def test_expiration_must_be_a_number(seconds):
    with pytest.raises(TypeError, match="expiration must be a number of seconds"):
        protocol.validate_expiration(seconds)


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


def test_validate_user_headers_returns_a_copy():
    given = {"trace": "abc"}
    checked = protocol.validate_user_headers(given)
    assert checked == given and checked is not given
    assert protocol.validate_user_headers(None) == {}


@pytest.mark.parametrize("name", [
    "crew-deadline", "crew-anything", "crew-gzip", "x-death", "x-first-death-reason",
    "x-last-death-exchange", "x-delivery-count", "x-received-from", "x-shovelled",
    "x-stream-offset", "x-amqp-1.0-properties", "x-opt-foo", "CC", "BCC"])
def test_validate_user_headers_refuses_reserved_names(name):
    with pytest.raises(ValueError, match=f"header name '{name}' is reserved"):
        protocol.validate_user_headers({"fine": 1, name: 2})


@pytest.mark.parametrize("name", ["x-request", "x-request-id", "x-tenant", "x-match",
                                  "x-deathly", "cc", "Crew-Case"])
def test_validate_user_headers_lets_other_names_through(name):
    assert protocol.validate_user_headers({name: 1}) == {name: 1}


def test_validate_user_headers_refuses_non_dicts_and_non_str_names():
    with pytest.raises(TypeError, match="headers must be a dict"):
        protocol.validate_user_headers([("a", 1)])
    with pytest.raises(TypeError, match="header names must be str"):
        protocol.validate_user_headers({1: "a"})


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

