"""Fixtures of the torchtitan integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_offline_assets


@pytest.fixture(scope="session")
def offline_assets(tmp_path_factory) -> dict[str, Path]:
    return make_offline_assets(tmp_path_factory.mktemp("titan_assets"))
