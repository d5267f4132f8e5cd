"""Shared fixtures: tiny random models in diffusers format, built once per test session (offline)."""

from __future__ import annotations

import pytest


def _tiny(tmp_path_factory, family: str):
    from diffserve.testing import make_tiny_model

    return make_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}") / "model")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny FLUX.1-dev-shaped model (guidance-distilled, CLIP + T5): a directory with model_index.json."""
    return _tiny(tmp_path_factory, "flux")


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory):
    """A tiny FLUX.1-schnell-shaped model (no guidance embedding, fixed shift)."""
    return _tiny(tmp_path_factory, "flux-schnell")


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A tiny Wan2.1-T2V-shaped model (UMT5, AutoencoderKLWan, UniPC flow scheduler)."""
    return _tiny(tmp_path_factory, "wan")


@pytest.fixture(scope="session")
def tiny_generic_dir(tmp_path_factory):
    """A tiny Stable Diffusion 3 model: served through the generic diffusers path."""
    return _tiny(tmp_path_factory, "sd3")


@pytest.fixture(scope="session")
def tiny_wan22_dir(tmp_path_factory):
    """A tiny Wan2.2-A14B-shaped model: two DiTs, the second below boundary_ratio of the schedule."""
    return _tiny(tmp_path_factory, "wan2.2")
