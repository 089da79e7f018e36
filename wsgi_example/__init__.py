"""The article's endpoints as a Flask application over :class:`crew.SyncClient`, served by
gunicorn (or any WSGI server), calling ``worker_example``'s tasks::

    python -m worker_example -H localhost &
    gunicorn --workers 2 --threads 8 'wsgi_example:create_app()'

Flask and gunicorn are not crew's dependencies: ``pip install flask gunicorn`` (they are in
crew's ``test`` extra). README.md, "The synchronous client", has the walk-through.
"""

from .app import CHANNEL, create_app

__all__ = ["CHANNEL", "create_app"]
