"""The task registry as a worker's call path meets it, without a broker (the calls themselves:
tests/broker/test_calls.py)."""

from __future__ import annotations

import pytest

import crew


def test_registering_a_task_name_twice_is_an_error_and_functions_stay_callable():
    registry = crew.worker.TaskRegistry()

    @crew.Task("twice", registry=registry)
    def first(x):
        return x + 1

    assert first(1) == 2  # still the plain function
    with pytest.raises(ValueError, match="already registered"):
        crew.Task("twice", registry=registry)(lambda x: x)
    with pytest.raises(ValueError):
        crew.Task("has space")
