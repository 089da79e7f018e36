"""Broker tests: against the real RabbitMQ, in a vhost made for the run (tests/conftest.py)."""
