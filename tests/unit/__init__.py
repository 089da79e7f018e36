"""Unit tests: no broker, no network beyond loopback sockets they open themselves;
``python3 -m pytest tests/unit`` runs them alone in seconds."""
