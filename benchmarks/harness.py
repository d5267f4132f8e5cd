"""What the benchmark scripts share: building modules directly on the device in a dtype, fast random
weights there, our DiT sharing the
tensors of diffusers' one, timing a call (CUDA events on the GPU), the relative error of an output, freeing a model.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def bench_device(tiny: bool, script: str) -> torch.device | None:
    """The CPU for a --tiny check of a script, else the GPU; None (after saying why) where there is none.

    On the GPU the process's cuBLAS workspaces are then set up as diffserve's runner sets them
    (cuda_graphs.configure_blas_workspace: none, unless DIFFSERVE_BLAS_WORKSPACE=default), before any GEMM,
    so that ours is timed as it serves. The setting is per process, so diffusers in the same run gets it
    too: its baseline with cuBLAS's own workspaces is a second run with DIFFSERVE_BLAS_WORKSPACE=default.
    Each recorded row says which (record.py, "blas_workspace")."""
    if tiny:
        return torch.device("cpu")
    if torch.cuda.is_available():
        from diffserve.runtime.cuda_graphs import configure_blas_workspace

        configure_blas_workspace("cuda")
        return torch.device("cuda")
    print(f"{script} needs a CUDA GPU (use --tiny for a CPU check of the script)", file=sys.stderr)
    return None


def results_file(tiny: bool, script: str, results: Path) -> Path:
    """Where a run records its figures: --tiny (CPU) runs go to a temporary file, so that CPU figures never
    mix with the GPU results in `results`."""
    return Path(tempfile.gettempdir()) / f"{script}_tiny.jsonl" if tiny else results


def on_device(device: torch.device, dtype: torch.dtype, build):
    """build() constructed directly on `device` in `dtype` (a float32 CPU FLUX would need 48 GB first),
    in eval mode without gradients."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build().eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)


def init_weights_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fast random init where the weights live (the GPU): N(0, 0.02), norm weights near 1 so the
    attention logits stay realistic."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and not name.endswith("bias"):
                p.normal_(1.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def native_twin(ref: torch.nn.Module, family: str) -> torch.nn.Module:
    """Our DiT of `family` built on the meta device and given the diffusers DiT `ref`'s tensors
    (load_state_dict with assign=True): both models share one copy of the weights."""
    from diffserve.runtime.loader import dit_class

    with torch.device("meta"):
        ours = dit_class(family).from_config(dict(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval().requires_grad_(False)
    shared = {p.data_ptr() for p in ref.parameters()}
    assert all(p.data_ptr() in shared for p in ours.parameters()), "ours must share diffusers' tensors"
    return ours


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, float, torch.Tensor]:
    """(median ms, warm-up seconds, last output). CUDA events on the GPU, perf_counter on the CPU."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        out = fn()
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), warmup_s, out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

