"""Fixtures of the torchtitan integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_offline_assets
from .shared_launch import Launches


@pytest.fixture(scope="session")
def offline_assets(tmp_path_factory) -> dict[str, Path]:
    return make_offline_assets(tmp_path_factory.mktemp("titan_assets"))


@pytest.fixture(scope="session")
def _launches(request, offline_assets, tmp_path_factory) -> Launches:
    return Launches(request.session, offline_assets, tmp_path_factory.mktemp("launches"))


@pytest.fixture
def launched(_launches, request) -> tuple[dict, Path]:
    """(this test's run results by name, its folder): see shared_launch.py."""
    return _launches.results(request.node)
