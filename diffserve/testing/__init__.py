"""Test helpers that ship with diffserve: tiny random models in diffusers format, built offline."""

from diffserve.testing.tiny_models import FAMILIES, make_tiny_model, make_tiny_pipeline

__all__ = ["FAMILIES", "make_tiny_model", "make_tiny_pipeline"]
