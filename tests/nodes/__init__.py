"""Tests that start private RabbitMQ nodes of their own (tests.support.brokernode): the
fault suite (tests.support.faults) and TLS. Fixed ports: run one such session at a time."""
