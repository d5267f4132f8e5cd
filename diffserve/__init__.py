"""diffserve: a diffusion inference server (FLUX, Wan) with per-platform attention selection."""

__version__ = "0.1.0"
