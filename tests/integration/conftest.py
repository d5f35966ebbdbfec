"""Fixtures of the torchtitan integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def launched(_shared_launches, request) -> tuple[dict, Path]:
    """(this test's run results by name, its folder): see shared_launch.py."""
    return _shared_launches.results(request.node)
