import pytest

from tests.registry import fakes


@pytest.fixture
def fake_methods(fresh_registry):
    """The fake methods registered as a plugin for one test, unregistered after."""
    fresh_registry.register_plugin(fakes.FakePlugin(), name="fakes")
    fakes.CALLS.clear()
    yield fresh_registry.get_methods()
    fresh_registry.unregister_plugin("fakes")
