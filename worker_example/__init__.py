"""The article's worker: tasks ``test``, ``stat``, ``dead``, ``publish`` and ``sleep``.

``python -m worker_example -H localhost`` serves them (``--help`` lists the options). The
tasks live in a registry of their own, :data:`tasks`, so that tests and other programs can
serve them in-process: ``Worker(worker_example.tasks, settings=worker_example.settings)``.
"""

from .tasks import CHANNEL, settings, tasks

__all__ = ["CHANNEL", "settings", "tasks"]
