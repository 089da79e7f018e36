"""Every test of this tier carries the ``broker`` marker: ``-m "not broker"`` leaves them out
of a run that names several tiers."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.broker)
