from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="crew",
    version="0.1.0",
    description="Task-worker RPC over RabbitMQ with an asyncio/Tornado client and gateway",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["crew", "crew.*"]),
    package_data={"crew": ["py.typed"]},
    install_requires=["tornado>=6,<7", "pika>=1.3,<1.5", "msgpack>=1.0,<2"],
    extras_require={
        # Optional: Prometheus metrics and OpenTelemetry traces (README, "Metrics and traces").
        # start_http_server returns its server from prometheus_client 0.17 on.
        "metrics": ["prometheus_client>=0.17"],
        "otel": ["opentelemetry-api>=1.20"],
        # The metrics and otel libraries (and OpenTelemetry's SDK, whose in-memory exporter
        # sees the spans) so that CI runs the tests of both; crew itself never needs them.
        "test": ["pytest>=7", "pytest-tornado>=0.8", "hypothesis>=6",
                 "prometheus_client>=0.17", "opentelemetry-api>=1.20",
                 "opentelemetry-sdk>=1.20"],
        # Pinned: a new release of either may find new things, which CI must not learn
        # from a stranger's upload.
        "lint": ["ruff==0.17.6", "mypy==2.4.1"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: Tornado",
        "Framework :: AsyncIO",
        "Topic :: System :: Distributed Computing",
    ],
)
