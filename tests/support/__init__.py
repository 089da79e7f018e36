"""Helpers the test tiers share, importable (``from tests.support.processes import ...``):

- ``broker``: where the broker under test is and how to run its ``rabbitmqctl``;
- ``processes``: child Python processes with the test vhost, their output, their stop;
- ``rawamqp``: a plain pika channel for what crew's own API must not do;
- ``brokernode``: a private RabbitMQ node (faults, TLS);
- ``faults``: the fault harness, a pytest plugin of tests/nodes/test_faults.py;
- ``cluster``: a RabbitMQ 4.x cluster at a test's own base port, and its faults;
- ``logs``: waiting on what the test's process logs;
- ``bombs``, ``connect``, ``hostile``, ``quorum``: helpers of one subject's unit and broker
  tests.
"""
