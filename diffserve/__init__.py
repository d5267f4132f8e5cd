"""diffserve: a diffusion inference server (FLUX, Wan) with per-platform attention selection.

`import diffserve` stays light (no torch): the Python API is imported on first use.

    import diffserve
    result = diffserve.generate("a red fox", model="black-forest-labs/FLUX.1-dev", seed=0, output="fox.png")
"""

__version__ = "0.1.0"

# name -> (module, attribute): resolved lazily by __getattr__.
_LAZY = {
    "generate": ("diffserve.runtime.runner", "generate"),
    "load_runner": ("diffserve.runtime.runner", "load_runner"),
    "GenerationRequest": ("diffserve.runtime.api", "GenerationRequest"),
    "GenerationResult": ("diffserve.runtime.api", "GenerationResult"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'diffserve' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
