"""``python -m worker_example -H localhost``: serve the example's tasks until SIGTERM."""

from crew.worker import main

from . import settings, tasks

main(tasks, settings, prog="python -m worker_example")
