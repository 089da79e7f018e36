"""The checks of what callers and task authors give crew (crew.validation)."""

from __future__ import annotations

import pytest

from crew import protocol, validation

# --- task names ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "test", "stat.v2", "mail:send", "é" * 100, "x" * 200,
                                  "crew-ish_name/with-punctuation"])
def test_task_names_that_are_accepted(name):
    assert validation.validate_task_name(name) == name


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
        validation.validate_task_name(name)


@pytest.mark.parametrize("name", [None, 1, b"bytes", ["x"]])
def test_task_name_must_be_a_str(name):
    with pytest.raises(TypeError, match="task name must be a str"):
        validation.validate_task_name(name)


# --- priorities ------------------------------------------------------------------------

@pytest.mark.parametrize("priority", [0, 1, 10, 255])
def test_priorities_in_range(priority):
    assert validation.validate_priority(priority) == priority


@pytest.mark.parametrize("priority", [-1, 256, 1000])
def test_priorities_out_of_range(priority):
    with pytest.raises(ValueError, match=r"priority must be in 0\.\.255, got " + str(priority)):
        validation.validate_priority(priority)


@pytest.mark.parametrize("priority", [True, 1.0, "1", None])
def test_priority_must_be_an_int(priority):
    with pytest.raises(TypeError, match="priority must be an int"):
        validation.validate_priority(priority)


@pytest.mark.parametrize("value", [1, 10, 255])
def test_max_priority_in_range(value):
    assert validation.validate_max_priority(value) == value


@pytest.mark.parametrize("value", [0, -1, 256])
def test_max_priority_out_of_range(value):
    with pytest.raises(ValueError, match=r"max_priority must be in 1\.\.255"):
        validation.validate_max_priority(value)


@pytest.mark.parametrize("value", [False, 10.0, "10"])
def test_max_priority_must_be_an_int(value):
    with pytest.raises(TypeError, match="max_priority must be an int"):
        validation.validate_max_priority(value)


# --- expirations and deadlines ---------------------------------------------------------

@pytest.mark.parametrize("seconds", [0.001, 1, 60, 60.5, protocol.MAX_EXPIRATION])
def test_expirations_in_range(seconds):
    assert validation.validate_expiration(seconds) == float(seconds)
    assert isinstance(validation.validate_expiration(seconds), float)


@pytest.mark.parametrize("seconds", [0, -1, protocol.MAX_EXPIRATION + 0.001, float("inf"),
                                     float("nan")])
def test_expirations_out_of_range(seconds):
    with pytest.raises(ValueError, match="more than 0 and at most 1500 seconds"):
        validation.validate_expiration(seconds)


@pytest.mark.parametrize("seconds", [True, "60", None])
def test_expiration_must_be_a_number(seconds):
    with pytest.raises(TypeError, match="expiration must be a number of seconds"):
        validation.validate_expiration(seconds)


def test_validate_user_headers_returns_a_copy():
    given = {"trace": "abc"}
    checked = validation.validate_user_headers(given)
    assert checked == given and checked is not given
    assert validation.validate_user_headers(None) == {}


@pytest.mark.parametrize("name", [
    "crew-deadline", "crew-anything", "crew-gzip", "x-death", "x-first-death-reason",
    "x-last-death-exchange", "x-delivery-count", "x-received-from", "x-shovelled",
    "x-stream-offset", "x-amqp-1.0-properties", "x-opt-foo", "CC", "BCC"])
def test_validate_user_headers_refuses_reserved_names(name):
    with pytest.raises(ValueError, match=f"header name '{name}' is reserved"):
        validation.validate_user_headers({"fine": 1, name: 2})


@pytest.mark.parametrize("name", ["x-request", "x-request-id", "x-tenant", "x-match",
                                  "x-deathly", "cc", "Crew-Case"])
def test_validate_user_headers_lets_other_names_through(name):
    assert validation.validate_user_headers({name: 1}) == {name: 1}


def test_validate_user_headers_refuses_non_dicts_and_non_str_names():
    with pytest.raises(TypeError, match="headers must be a dict"):
        validation.validate_user_headers([("a", 1)])
    with pytest.raises(TypeError, match="header names must be str"):
        validation.validate_user_headers({1: "a"})
