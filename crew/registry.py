"""The task registry: ``@Task('name')`` and the names-to-functions map a worker serves."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from . import validation

__all__ = ["Settings", "Task", "TaskFunction", "TaskRegistry", "tasks"]

TaskFunction = Callable[[Any], Any]


class TaskRegistry(dict[str, TaskFunction]):
    """Task names mapped to their functions."""

    def add(self, name: str, func: TaskFunction) -> None:
        validation.validate_task_name(name)
        if not callable(func):
            raise TypeError(f"task {name!r} must be callable, got {type(func).__name__}")
        if name in self:
            raise ValueError(f"task {name!r} is already registered (to {self[name]!r})")
        self[name] = func


#: The registry that ``@Task`` fills unless given another; :func:`run` serves it.
tasks = TaskRegistry()


class Task:
    """Decorator that registers a function as the task ``name``; the function is unchanged."""

    def __init__(self, name: str, *, registry: TaskRegistry | None = None) -> None:
        self.name = validation.validate_task_name(name)
        self.registry = tasks if registry is None else registry

    def __call__(self, func: TaskFunction) -> TaskFunction:
        self.registry.add(self.name, func)
        return func


class Settings(SimpleNamespace):
    """``context.settings``: ``run()``'s keyword arguments plus ``uuid`` and ``options``."""
