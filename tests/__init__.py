"""crew's tests, in three tiers: ``unit/`` (no broker, seconds), ``broker/`` (the real
RabbitMQ, a vhost of its own per run) and ``nodes/`` (private RabbitMQ nodes: faults, TLS).
Helpers shared by the tiers live in the importable package ``tests.support``; fixtures in
``conftest.py`` files."""
