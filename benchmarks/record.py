"""Append one benchmark figure to benchmarks/results.jsonl (one JSON object per line)."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def blas_workspace() -> str:
    """The cuBLAS workspace settings of this process (harness.bench_device sets them): "default", or the
    variables as set."""
    names = ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE")
    return " ".join(f"{n}={os.environ[n]}" for n in names if n in os.environ) or "default"


def record(
    benchmark: str, impl: str, ms: float, tflops: float | None = None, path: Path | None = None, **extra
) -> dict:
    row = {
        "date": datetime.date.today().isoformat(),
        "device": extra.pop("device", None) or device_name(),
        "benchmark": benchmark,
        "impl": impl,
        "ms": round(float(ms), 4),
        "tflops": None if tflops is None else round(float(tflops), 2),
        "command": extra.pop("command", None) or " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "blas_workspace": blas_workspace(),
        **extra,
    }
    with open(path or RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
