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
    package_data={"crew": ["py.typed", "dashboard.html"]},
    install_requires=["tornado>=6,<7", "pika>=1.3,<1.5", "msgpack>=1.0,<2"],
    # The `crew` command (README, "The crew command"); and crew.testing, fixtures for tests
    # of code that calls crew (README, "Testing code that calls crew"), which pytest loads
    # in every run: it costs no broker contact until a test uses it.
    entry_points={"console_scripts": ["crew = crew.command:main"],
                  "pytest11": ["crew = crew.testing"]},
    extras_require={
        # Optional: Prometheus metrics and OpenTelemetry traces (README, "Metrics and traces").
        # start_http_server returns its server from prometheus_client 0.17 on.
        "metrics": ["prometheus_client>=0.17"],
        "otel": ["opentelemetry-api>=1.20"],
        # Flask and gunicorn: the WSGI example (wsgi_example/) that the tests serve with
        # gunicorn, whose --no-control-socket came in 25.1; gevent and eventlet: the tests
        # that SyncClient refuses their monkey-patching; the metrics and otel libraries (and
        # OpenTelemetry's SDK, whose in-memory exporter sees the spans), so that CI runs the
        # tests of both; selenium: the dashboard's browser tests drive Debian's chromium and
        # chromedriver with it (tests/support/browser.py, whose test checks that selenium's
        # driver downloader, selenium-manager, there from 4.6, never runs). None of them is
        # crew's dependency.
        "test": ["pytest>=7", "pytest-tornado>=0.8", "hypothesis>=6", "flask>=2.2",
                 "gunicorn>=25.1", "gevent>=22", "eventlet>=0.33",
                 "prometheus_client>=0.17", "opentelemetry-api>=1.20",
                 "opentelemetry-sdk>=1.20", "selenium>=4.6"],
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
