"""Every test under tests/integration is ``multiprocess``: nearly all start real processes
(torchrun jobs, ``ftdiff train``, SeaweedFS, moto, Prometheus, network namespaces), and the
few in-process training runs here are as slow. ``make test-fast`` leaves them all out; unit
tests that start processes carry the marker themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.multiprocess)
