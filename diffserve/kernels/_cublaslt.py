"""The few cuBLASLt calls a GEMM with a chosen algorithm needs, through ctypes (used by kernels/gemm.py).

PyTorch calls cuBLASLt with the first algorithm of its heuristic list and offers no way to pick another;
on an H100 that first pick is up to 15% slower than the best of the list for some DiT shapes (e.g. FLUX's
4,608-row projections, benchmarks/RESULTS.md session 4). So we ask cuBLASLt for its candidates ourselves,
time them once per shape (kernels/gemm.py) and launch the winner. The library is the one torch already
loaded: no new dependency.

Layout: torch tensors are row-major and cuBLASLt is column-major, so y = x @ W^T (x: M x K, W: N x K, y:
M x N, all row-major) is computed as y^T = op_T(W^T) @ x^T in cuBLASLt's terms: A = W stored K x N
column-major (ld = W's row stride) and transposed, B = x stored K x M (ld = x's row stride), D = y stored
N x M (ld = y's row stride). Row strides may exceed the row length, so column slices of a weight and row
blocks of a wider buffer are used in place. The enum values and struct layout below are cuBLASLt's
(cublasLt.h, CUDA 12 and 13).
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F: float32 accumulation, as torch uses
_R_32F = 0  # cudaDataType_t
DATA_TYPES = {torch.bfloat16: 14, torch.float16: 2}
_OP_N, _OP_T = 0, 1
# cublasLtMatmulDescAttributes_t
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
# cublasLtEpilogue_t
EPILOGUE_DEFAULT, EPILOGUE_BIAS, EPILOGUE_GELU, EPILOGUE_GELU_BIAS = 1, 4, 32, 36
# cublasLtMatmulPreferenceAttributes_t
_PREF_MAX_WORKSPACE, _PREF_REDUCTION_MASK = 1, 3
_PREF_MIN_ALIGNMENT = {"a": 5, "b": 6, "c": 7, "d": 8}
# Split-K partial sums may only be reduced in float32 (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE): the other
# schemes add the partials in the output dtype (bf16), a precision loss torch's default path does not have.
_REDUCTION_COMPUTE_TYPE = 2
WORKSPACE_BYTES = 32 << 20  # what torch gives cuBLASLt on Hopper


class HeuristicResult(ctypes.Structure):
    """cublasLtMatmulHeuristicResult_t (96 bytes)."""

    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),  # cublasLtMatmulAlgo_t: opaque
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves_count", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


class CublasLtError(RuntimeError):
    pass


def _loaded_library_path() -> str | None:
    """The libcublasLt torch's CUDA build loaded (from /proc/self/maps), so we share its copy."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith("libcublasLt.so"):
                    return path
    except OSError:
        pass
    return None


def _open_library() -> ctypes.CDLL:
    major = (torch.version.cuda or "").split(".")[0]
    candidates = [_loaded_library_path(), f"libcublasLt.so.{major}" if major else None, "libcublasLt.so"]
    errors = []
    for name in filter(None, candidates):
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(f"{name}: {e}")
    raise CublasLtError("libcublasLt not found (" + "; ".join(errors) + ")")


def _declare(lib: ctypes.CDLL) -> None:
    p, vp, i, sz = ctypes.POINTER, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    signatures = {
        "cublasLtCreate": [p(vp)],
        "cublasLtMatmulDescCreate": [p(vp), i, i],
        "cublasLtMatmulDescSetAttribute": [vp, i, vp, sz],
        "cublasLtMatrixLayoutCreate": [p(vp), i, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
        "cublasLtMatmulPreferenceCreate": [p(vp)],
        "cublasLtMatmulPreferenceSetAttribute": [vp, i, vp, sz],
        "cublasLtMatmulPreferenceDestroy": [vp],
        "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, i, p(HeuristicResult), p(i)],
        "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"{what} failed with cublasStatus_t {status}")


class Library:
    """One process-wide cuBLASLt handle. Raises CublasLtError where the library cannot be opened."""

    def __init__(self):
        self.lib = _open_library()
        _declare(self.lib)
        self.handle = ctypes.c_void_p()
        _check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self._one, self._zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _set(self, setter, obj, attr: int, value: ctypes._SimpleCData) -> None:
        _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), setter.__name__)

    def _layout(self, dtype: int, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, ld), "layout")
        return layout


class Problem:
    """One GEMM shape and epilogue: y (M x N, row stride ldd) = epilogue(x (M x K, ldx) @ W^T (W: N x K,
    ldw) + bias) + beta * y. Holds cuBLASLt's descriptors; launch() runs it with any tensors of this shape.
    Not thread-safe by itself (the bias pointer lives in the shared descriptor): kernels/gemm.py locks."""

    def __init__(self, lib: Library, dtype: torch.dtype, m, n, k, ldx, ldw, ldd, epilogue, accumulate, align):
        self.lib, self.accumulate = lib, accumulate
        self.desc = ctypes.c_void_p()
        _check(lib.lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "desc")
        set_desc = lib.lib.cublasLtMatmulDescSetAttribute
        lib._set(set_desc, self.desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
        lib._set(set_desc, self.desc, _DESC_TRANSB, ctypes.c_int32(_OP_N))
        lib._set(set_desc, self.desc, _DESC_EPILOGUE, ctypes.c_int32(epilogue))
        t = DATA_TYPES[dtype]
        self.a = lib._layout(t, k, n, ldw)
        self.b = lib._layout(t, k, m, ldx)
        self.d = lib._layout(t, n, m, ldd)
        self.align = align
        self.algo: HeuristicResult | None = None

    def candidates(self, count: int) -> list[HeuristicResult]:
        """cuBLASLt's heuristic list for this problem (best guess first), at most `count`."""
        lib = self.lib.lib
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        try:
            set_pref = lib.cublasLtMatmulPreferenceSetAttribute
            self.lib._set(set_pref, pref, _PREF_MAX_WORKSPACE, ctypes.c_uint64(WORKSPACE_BYTES))
            self.lib._set(set_pref, pref, _PREF_REDUCTION_MASK, ctypes.c_uint32(_REDUCTION_COMPUTE_TYPE))
            for operand, attr in _PREF_MIN_ALIGNMENT.items():
                self.lib._set(set_pref, pref, attr, ctypes.c_uint32(self.align[operand]))
            results = (HeuristicResult * count)()
            found = ctypes.c_int(0)
            status = lib.cublasLtMatmulAlgoGetHeuristic(
                self.lib.handle,
                self.desc,
                self.a,
                self.b,
                self.d,
                self.d,
                pref,
                count,
                results,
                ctypes.byref(found),
            )
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        _check(status, "cublasLtMatmulAlgoGetHeuristic")
        return [results[i] for i in range(found.value) if results[i].state == 0]

    def launch(self, algo: HeuristicResult, x, w, bias, out, workspace: torch.Tensor, stream: int) -> None:
        """Queue the GEMM on `stream` (a cudaStream_t as int). Pointers are not checked here: gemm.py does."""
        lib = self.lib
        if bias is not None:
            lib._set(
                lib.lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias)
            )
        beta = lib._one if self.accumulate else lib._zero
        status = lib.lib.cublasLtMatmul(
            lib.handle, self.desc, ctypes.byref(lib._one), w, self.a, x, self.b, ctypes.byref(beta),
            out, self.d, out, self.d, ctypes.byref(algo.algo), workspace.data_ptr(), WORKSPACE_BYTES, stream,
        )  # fmt: skip
        _check(status, "cublasLtMatmul")


_library: Library | None = None
_library_error: str | None = None
_library_lock = threading.Lock()


def library() -> Library | None:
    """The process's cuBLASLt, or None (why: library_error()) where it cannot be opened."""
    global _library, _library_error
    with _library_lock:
        if _library is None and _library_error is None:
            try:
                _library = Library()
            except (CublasLtError, OSError, AttributeError) as e:
                _library_error = str(e)
        return _library


def library_error() -> str | None:
    return _library_error
