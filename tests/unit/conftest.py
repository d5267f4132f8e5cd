import pytest

from tests.unit.platform_sim import Simulator, reset_all


@pytest.fixture
def simulate(monkeypatch):
    """simulate("rocm", hip="6.2.41133") etc.; restores torch and the caches afterwards."""
    yield Simulator(monkeypatch)
    monkeypatch.undo()
    reset_all()
