"""The DiT blocks' linear layers: y = x @ W^T (+ bias) (then GELU(tanh)), into a new tensor, into a given
buffer, or accumulated into one (y += x @ W^T).

On CUDA (bf16/fp16) each distinct problem — shape, strides, epilogue, pointer alignment — is handed to
cuBLASLt with an algorithm picked by timing: the first call of a shape asks cuBLASLt for up to 16
candidate algorithms, runs each a few times on a scratch output, and keeps the fastest for the life of
the process. torch launches the heuristic's first guess instead, which on an H100 is up to 15% slower for
several FLUX and Wan shapes (benchmarks/RESULTS.md, session 4). Everything else — the CPU, ROCm, other
dtypes, unsupported strides, inside torch.compile, DIFFSERVE_GEMM_TUNING=0, a cuBLASLt that cannot be
opened, a problem first seen while a CUDA graph is being captured (no timing possible then) — runs the
torch call the blocks made before, so CPU results are unchanged bit for bit.

Numerics: float32 accumulation as torch's; candidate algorithms that split K may only reduce their
partial sums in float32. Different algorithms sum in different orders, so results differ from torch's in
the last bf16 bit of some elements; one process always uses the same algorithm for a problem, so repeated
calls (and CUDA-graph replays) are bit-identical.

Constraint: one cuBLASLt workspace per device, so two of these GEMMs must not run concurrently on
different streams of one device (the runtime runs a model's GEMMs on one stream).
"""

from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F

from diffserve.kernels import _cublaslt as lt

ENV_VAR = "DIFFSERVE_GEMM_TUNING"
CANDIDATES = 16  # heuristic candidates timed per problem
_TIMED_RUNS = 5

log = logging.getLogger(__name__)
_enabled: bool | None = None
_lock = threading.Lock()
_plans: dict[tuple, tuple[lt.Problem, lt.HeuristicResult] | None] = {}
_workspaces: dict[int, torch.Tensor] = {}


def set_gemm_tuning(enabled: bool | None) -> None:
    """Force the tuned cuBLASLt path on or off for this process (None: back to the environment's choice)."""
    global _enabled
    _enabled = enabled


def gemm_tuning_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def alignment(ptr: int) -> int:
    """The largest power of two (at most 256, cuBLASLt's default assumption) that divides a byte address."""
    return 256 if ptr % 256 == 0 else ptr & -ptr


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    gelu: bool = False,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """x (..., K) @ weight (N, K)^T + bias (N,), then GELU(tanh) if gelu. weight may be a column slice of
    a wider matrix. out: write there instead of a new tensor — a (rows, N) matrix with unit column stride
    (e.g. a block of rows of a wider buffer) or any tensor that views as one; accumulate: out += x @ W^T
    (no bias, no GELU). Returns the result (out when given)."""
    n, k = weight.shape
    if accumulate and (out is None or bias is not None or gelu):
        raise ValueError("accumulate adds x @ W^T into `out`: pass out, and no bias or gelu")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight takes {k}")
    x2 = x.reshape(-1, k)
    out2 = None if out is None else (out if out.dim() == 2 else out.view(-1, n))
    if out2 is not None and out2.shape != (x2.shape[0], n):
        raise ValueError(f"out must hold {x2.shape[0]} x {n} results; got {tuple(out.shape)}")
    plan = _plan(x2, weight, bias, out2, gelu, accumulate) if _lt_usable(x2, weight, bias, out2) else None
    if plan is None:
        return _torch_linear(x, x2, weight, bias, gelu, out, out2, accumulate)
    result = out
    if out2 is None:
        out2 = torch.empty(x2.shape[0], n, device=x.device, dtype=x.dtype)
        result = out2.view(*x.shape[:-1], n)
    problem, algo = plan
    stream = torch.cuda.current_stream(x.device).cuda_stream
    bias_ptr = None if bias is None else bias.data_ptr()
    with _lock:  # the bias pointer is set on the problem's shared descriptor
        problem.launch(
            algo, x2.data_ptr(), weight.data_ptr(), bias_ptr, out2.data_ptr(), _workspace(x.device), stream
        )
    return result


def _torch_linear(x, x2, weight, bias, gelu, out, out2, accumulate):
    """The torch calls the blocks made before this module (CPU results stay bit-identical)."""
    if accumulate:
        out2.addmm_(x2, weight.t())
        return out
    if gelu:
        if x.is_cuda and bias is not None and x.dtype in lt.DATA_TYPES:  # cuBLASLt's GELU epilogue
            y = torch._addmm_activation(bias, x2, weight.t(), use_gelu=True).view(*x.shape[:-1], -1)
        else:
            y = F.gelu(F.linear(x, weight, bias), approximate="tanh")
    elif out is not None:
        if bias is None:
            torch.mm(x2, weight.t(), out=out2)
        else:
            torch.addmm(bias, x2, weight.t(), out=out2)
        return out
    else:
        y = F.linear(x, weight, bias)
    if out is None:
        return y
    out2.copy_(y.reshape(out2.shape))
    return out


def _lt_usable(x2, weight, bias, out2) -> bool:
    if not (x2.is_cuda and gemm_tuning_enabled() and torch.version.cuda is not None):
        return False
    if torch.compiler.is_compiling() or x2.dtype not in lt.DATA_TYPES or weight.dtype != x2.dtype:
        return False
    tensors = [x2, weight] + ([] if out2 is None else [out2])
    n, k = weight.shape
    if x2.shape[0] == 0 or any(t.device != x2.device or t.stride(-1) != 1 for t in tensors):
        return False
    # cuBLASLt's layouts need a leading dimension at least as long as a row (column-major "rows" here).
    if (
        x2.stride(0) < k
        or weight.stride(0) < k
        or (out2 is not None and (out2.stride(0) < n or out2.dtype != x2.dtype))
    ):
        return False
    if bias is not None and (
        bias.dim() != 1 or bias.stride(0) != 1 or bias.dtype != x2.dtype or bias.device != x2.device
    ):
        return False
    # Tensor-core algorithms need 16-byte aligned rows and pointers; anything less takes torch's path.
    size = x2.element_size()
    rows = [t.stride(0) * size for t in tensors] + ([n * size] if out2 is None else [])
    ptrs = [t.data_ptr() for t in tensors] + ([] if bias is None else [bias.data_ptr()])
    return all(alignment(v) >= 16 for v in rows + ptrs)


def _workspace(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    ws = _workspaces.get(index)
    if ws is None:
        ws = _workspaces[index] = torch.empty(lt.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return ws


def _plan(x2, weight, bias, out2, gelu, accumulate):
    """(problem, algorithm) for this call's problem, tuned on first sight; None: take torch's path."""
    n, k = weight.shape
    m = x2.shape[0]
    ldd = n if out2 is None else out2.stride(0)
    align = {
        "a": alignment(weight.data_ptr()),
        "b": alignment(x2.data_ptr()),
        "c": 256 if out2 is None else alignment(out2.data_ptr()),
    }
    align["d"] = align["c"]
    if gelu:
        epilogue = lt.EPILOGUE_GELU if bias is None else lt.EPILOGUE_GELU_BIAS
    else:
        epilogue = lt.EPILOGUE_DEFAULT if bias is None else lt.EPILOGUE_BIAS
    key = (
        x2.device.index,
        x2.dtype,
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        ldd,
        epilogue,
        accumulate,
        *align.values(),
    )
    plan = _plans.get(key, False)
    if plan is not False:
        return plan
    if torch.cuda.is_current_stream_capturing():
        return None  # cannot time inside a capture; this problem was not seen in the warm-up
    library = lt.library()
    if library is None:
        log.warning("tuned GEMMs off: %s", lt.library_error())
        set_gemm_tuning(False)
        return None
    with _lock:
        try:
            problem = lt.Problem(
                library, x2.dtype, m, n, k, x2.stride(0), weight.stride(0), ldd, epilogue, accumulate, align
            )
            algo = _fastest(problem, problem.candidates(CANDIDATES), x2, weight, bias, m, ldd)
        except lt.CublasLtError as e:
            log.warning("cuBLASLt cannot run %s (%s); using torch's GEMM for it", key, e)
            algo = None
        _plans[key] = plan = None if algo is None else (problem, algo)
    return plan


def _fastest(problem, candidates, x2, weight, bias, m, ldd):
    """Time each candidate (a scratch output, so accumulating problems leave their real output alone)."""
    if not candidates:
        return None
    device = x2.device
    scratch = torch.zeros(m, ldd, device=device, dtype=x2.dtype)
    stream = torch.cuda.current_stream(device)
    ws = _workspace(device)
    args = (
        x2.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        scratch.data_ptr(),
        ws,
        stream.cuda_stream,
    )
    best, best_ms = None, float("inf")
    for algo in candidates:
        try:
            problem.launch(algo, *args)
        except lt.CublasLtError:
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(_TIMED_RUNS):
            problem.launch(algo, *args)
        end.record(stream)
        end.synchronize()
        ms = start.elapsed_time(end)
        if ms < best_ms:
            best, best_ms = algo, ms
    return best


def tuned_problems() -> int:
    """How many problems have a tuned cuBLASLt algorithm (diagnostics and tests)."""
    return sum(plan is not None for plan in _plans.values())


def clear() -> None:
    """Forget every tuned problem (tests)."""
    with _lock:
        _plans.clear()
