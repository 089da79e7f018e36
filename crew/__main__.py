"""``python -m crew``: the ``crew`` command (:mod:`crew.command`)."""

from .command import main

main()
