"""Shared test setup: hypothesis profiles and a clean plugin manager per test.

Profiles: ``ci`` (default; few examples, no deadline, so the suite stays fast on 2 cores) and
``thorough`` (many examples). Pick one with ``HYPOTHESIS_PROFILE=thorough``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# the 8-bit codec's fused step runs its graph eagerly in tests (same numbers as compiled, up to the
# last bits of the update): compiling it costs a minute or more per shape on a small shared CPU.
# Rank workers inherit it. tests/optim/test_quant8_fused.py compiles it once, on a small shape.
os.environ.setdefault("SLIMTRAIN_FUSED_CODEC", "eager")


@pytest.fixture
def fresh_registry(monkeypatch):
    """A plugin manager rebuilt for this test and forgotten after it (env changes stay local)."""
    from slimtrain.registry import manager

    manager.reset()
    yield manager
    manager.reset()


@pytest.fixture(scope="session")
def offline_assets(tmp_path_factory):
    """A tiny jsonl text folder and tokenizers for the training tests (tests/integration/helpers.py)."""
    from tests.integration.helpers import make_offline_assets

    return make_offline_assets(tmp_path_factory.mktemp("titan_assets"))


@pytest.fixture(scope="session", autouse=True)
def _shared_launches(request, tmp_path_factory):
    """The trainings of the selected tests marked ``launch``, started in the background before the
    first test (tests/integration/shared_launch.py); None when no such test is selected."""
    if not any(item.get_closest_marker("launch") is not None for item in request.session.items):
        yield None
        return
    from tests.integration.helpers import env
    from tests.integration.shared_launch import Launches

    assets = request.getfixturevalue("offline_assets")
    launches = Launches(request.session, assets, tmp_path_factory.mktemp("launches"), env())
    yield launches
    launches.stop()
