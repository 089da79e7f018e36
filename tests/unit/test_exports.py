"""The public surface: what ``crew`` exports, the error tree, and the article's import paths."""

from __future__ import annotations

import builtins
import importlib

import pytest

import crew
from crew import exceptions


def test_all_is_sorted_and_without_duplicates():
    assert crew.__all__ == sorted(crew.__all__)
    assert len(set(crew.__all__)) == len(crew.__all__)


@pytest.mark.parametrize("name", crew.__all__)
def test_every_exported_name_exists(name):
    assert getattr(crew, name) is not None
    namespace: dict = {}
    exec(f"from crew import {name}", namespace)  # the import statement itself
    assert namespace[name] is getattr(crew, name)


def test_public_names_of_the_package_are_all_exported():
    public = {name for name in vars(crew)
              if not name.startswith("_") and not isinstance(getattr(crew, name), type(crew))}
    assert public <= set(crew.__all__)


def test_every_exception_class_is_exported():
    classes = {name for name, value in vars(exceptions).items()
               if isinstance(value, type) and issubclass(value, BaseException)
               and value.__module__ == exceptions.__name__}
    assert classes == set(exceptions.__all__)
    assert classes <= set(crew.__all__)


ERRORS = [crew.CallError, crew.RemoteError, crew.TimeoutError, crew.ExpirationError,
          crew.UnknownTaskError, crew.ConnectionLostError, crew.BrokerError, crew.CodecError,
          crew.EncodeError, crew.DecodeError, crew.MessageTooLargeError]


@pytest.mark.parametrize("error", ERRORS)
def test_every_error_subclasses_crew_error(error):
    assert issubclass(error, crew.CrewError)
    assert issubclass(error, Exception)


def test_crew_error_is_the_root():
    assert crew.CrewError.__bases__ == (Exception,)


@pytest.mark.parametrize("error", [crew.RemoteError, crew.TimeoutError, crew.ExpirationError,
                                   crew.UnknownTaskError])
def test_call_outcomes_are_call_errors(error):
    assert issubclass(error, crew.CallError)


@pytest.mark.parametrize("error", [crew.EncodeError, crew.DecodeError,
                                   crew.MessageTooLargeError])
def test_codec_errors(error):
    assert issubclass(error, crew.CodecError)
    assert issubclass(error, ValueError)


def test_job_killed_is_a_system_exit_that_except_exception_does_not_catch():
    assert issubclass(crew.JobKilled, SystemExit)
    assert not issubclass(crew.JobKilled, Exception)
    assert not issubclass(crew.JobKilled, crew.CrewError)
    with pytest.raises(crew.JobKilled):
        try:
            raise crew.JobKilled("stop")
        except Exception:  # noqa: BLE001 - what a task's own error handling looks like
            pytest.fail("except Exception caught JobKilled")


@pytest.mark.parametrize("error", [crew.TimeoutError, crew.ExpirationError])
def test_timeouts_are_also_builtin_timeouts(error):
    assert issubclass(error, builtins.TimeoutError)
    assert crew.TimeoutError is not builtins.TimeoutError
    with pytest.raises(builtins.TimeoutError):
        raise error("late")


def test_other_builtin_bases():
    assert issubclass(crew.UnknownTaskError, LookupError)
    assert issubclass(crew.ConnectionLostError, ConnectionError)
    assert issubclass(crew.EncodeError, TypeError)


def test_error_attributes():
    remote = crew.RemoteError("KeyError", "'spoon'", "Traceback ...")
    assert (remote.type, remote.message, remote.traceback) == ("KeyError", "'spoon'",
                                                               "Traceback ...")
    assert str(remote) == "KeyError: 'spoon'"
    assert str(crew.RemoteError("Error", "")) == "Error"
    unknown = crew.UnknownTaskError("stat")
    assert unknown.task == "stat" and "crew.tasks.stat" in str(unknown)
    broker = crew.BrokerError("refused", 406, "PRECONDITION_FAILED")
    assert (broker.code, broker.text) == (406, "PRECONDITION_FAILED")


def test_error_tree_is_drawn_in_the_exceptions_docstring():
    for name in exceptions.__all__:
        assert name in exceptions.__doc__


def test_master_tornado_client_is_the_client():
    from crew.master.tornado import Client, Parallel

    assert Client is crew.Client
    assert Parallel is crew.Parallel


def test_worker_import_path_of_the_article():
    from crew.worker import Task, context, run

    assert Task is crew.Task
    assert context is crew.context
    assert callable(run)


@pytest.mark.parametrize("module", ["crew.codec", "crew.settings",
                                    "crew.client", "crew.worker", "crew.exceptions",
                                    "crew.master.tornado"])
def test_module_all_names_exist(module):
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names {name!r}, which does not exist"


def test_version():
    assert isinstance(crew.__version__, str) and crew.__version__.count(".") == 2
