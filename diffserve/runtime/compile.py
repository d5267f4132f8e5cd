"""Make a loaded DiT fast: fused projections, then torch.compile of its repeated blocks, with a persistent
compile cache so that a restarted server does not compile from scratch.

    from diffserve.runtime.compile import optimize_dit
    model = optimize_dit(model)                    # fuse + compile each block (default mode)
    model = optimize_dit(model, compile=False)     # fused projections only (eager; Triton fused ops on CUDA)

Regional compilation (each block compiled, not the whole model): the DiT is a stack of identical blocks,
and torch.compile traces a block's forward once and reuses the compiled code for every block of the same
class (parameters are graph inputs), so compile time is that of 2 blocks for FLUX and 1 for Wan instead of
57 and 30 (H100, FLUX.1-dev 1024^2: 12.9 s cold, 5.2 s from the persistent cache; diffusers' whole-model
compile: 81.5 s), and everything Inductor can fuse lies inside a block anyway.

Measured (benchmarks/RESULTS.md, issue 5): with the FA3 graph break gone (0 breaks), compiling still
gains nothing over our eager path, which already has the fused kernels (H100, FLUX.1-dev 1024^2, one run:
compiled 126.6 ms, eager 124.4, eager as a CUDA graph 122.6). So eager + CUDA graphs is the default and
compilation is opt-in: `--compile` on generate/serve (RuntimeConfig.compile), applied by loader.load_dit.

The cache: Inductor's FX-graph cache and autotuning cache are on-disk and keyed by graph and environment;
pointing TORCHINDUCTOR_CACHE_DIR at a directory that survives restarts makes the second start reuse the
compiled kernels. Which directory (compile_cache_dir): $DIFFSERVE_CACHE_DIR/inductor when that is set; else
the user's own TORCHINDUCTOR_CACHE_DIR; else ~/.cache/diffserve/inductor. torch itself writes its default
(/tmp/torchinductor_$USER) into TORCHINDUCTOR_CACHE_DIR the first time anything asks Inductor for its cache
directory (importing torch._inductor.config does in torch 2.13), so a value equal to torch's default is
torch's, not the user's. The directory must be set before the first compilation in the process, so
configure_compile_cache() runs first thing in optimize_dit().
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from diffserve import envs

if TYPE_CHECKING:  # torch is imported where it is used: the server imports the switch below without it
    from torch import nn

logger = logging.getLogger(__name__)

CACHE_ENV = "DIFFSERVE_CACHE_DIR"
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_cache_dir() -> Path:
    """Where compiled kernels go (see the module docstring for the order)."""
    root = envs.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "inductor"
    theirs = envs.TORCHINDUCTOR_CACHE_DIR
    if theirs:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

        if os.path.abspath(theirs) != os.path.abspath(torch_default()):
            return Path(theirs)
    return Path.home() / ".cache" / "diffserve" / "inductor"


def configure_compile_cache(cache_dir: str | Path | None = None) -> Path:
    """Point Inductor's on-disk caches at `cache_dir` (default: compile_cache_dir()) and turn the local
    FX-graph and autotune caches on. Returns the directory."""
    path = Path(cache_dir) if cache_dir is not None else compile_cache_dir()
    # A write that configures torch: Inductor reads its cache directory from this variable at every use.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    path.mkdir(parents=True, exist_ok=True)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    return path


def repeated_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of blocks: direct nn.ModuleList children whose items all share one class."""
    from torch import nn

    stacks = []
    for child in model.children():
        if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
            stacks.append(child)
    return stacks


def compile_dit(
    model: nn.Module,
    mode: str | None = None,
    regional: bool = True,
    dynamic: bool | None = False,
    backend: str = "inductor",
) -> nn.Module:
    """torch.compile the DiT in place: each block of its repeated stacks (regional=True) or the whole
    forward. mode is torch.compile's (None/"default", "max-autotune-no-cudagraphs", "reduce-overhead",
    "max-autotune"); dynamic=False specialises on the shapes seen (one recompilation per new resolution).
    backend="eager" traces without generating code (tests). Returns the model, compiled in place.

    The attention backend is resolved at the first call: run one eager forward before the compiled one, so
    the platform probe stays out of the traced code."""
    if mode not in MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; expected one of {MODES[1:]}")
    mode = None if mode == "default" else mode
    if not regional:
        model.compile(mode=mode, dynamic=dynamic, backend=backend)
        return model
    stacks = repeated_blocks(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no stack of repeated blocks to compile")
    for stack in stacks:
        for block in stack:
            block.compile(mode=mode, dynamic=dynamic, backend=backend)
    return model


def optimize_dit(
    model: nn.Module,
    *,
    fuse: bool = True,
    compile: bool = True,
    mode: str | None = None,
    regional: bool = True,
    cache_dir: str | Path | None = None,
) -> nn.Module:
    """Fused projections (model.fuse_projections(), if the model has it) and, with compile=True,
    compile_dit() under a persistent cache. Call after the model is loaded on its device and dtype, and
    before the warm-up generation (which is when compilation happens)."""
    if fuse and hasattr(model, "fuse_projections"):
        model.fuse_projections()
    if compile:
        path = configure_compile_cache(cache_dir)
        logger.info("compile: %s, mode %s, cache %s", "per block" if regional else "whole model", mode, path)
        compile_dit(model, mode=mode, regional=regional)
    return model


def compiled(model: nn.Module) -> bool:
    """Whether compile_dit ran on this model (either way)."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        return True
    return any(getattr(b, "_compiled_call_impl", None) is not None for s in repeated_blocks(model) for b in s)
