"""The article's master: a Tornado application whose handlers call crew tasks.

``python -m master_example --port 8888`` serves it beside ``python -m worker_example``
(docs/GATEWAY.md shows every endpoint with curl). Tests build it around a connected client
with :func:`make_app`.
"""

from .app import Listeners, make_app

__all__ = ["Listeners", "make_app"]
