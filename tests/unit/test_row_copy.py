"""kernels.row_copy.copy_rows: the Ulysses pack/unpack copies. A copy must be exact: the Triton kernel on
CUDA gives dst.copy_(src) bit for bit and writes nothing outside dst; elsewhere copy_ itself runs."""

from __future__ import annotations

import pytest
import torch

from diffserve.kernels.row_copy import copy_rows
from tests.unit.gpu_helpers import needs_cuda_triton


def _pack_views(device, dtype, groups=2, tokens=37, run=768, seed=0):
    """(dst, src, dst's whole buffer): src a token-major (tokens, groups * run) matrix read group-major, dst one
    slot of a (groups, tokens, 3, run) buffer — the shapes of the Ulysses pack."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(tokens, groups * run + 8, generator=g).to(device, dtype)[:, : groups * run]
    src = src.unflatten(1, (groups, run)).transpose(0, 1)
    buf = torch.zeros(groups, tokens, 3, run, device=device, dtype=dtype)
    return buf[:, :, 1], src, buf


def test_cpu_is_copy():
    dst, src, buf = _pack_views("cpu", torch.float32)
    assert copy_rows(dst, src) is dst
    assert torch.equal(dst, src) and (buf[:, :, 0] == 0).all() and (buf[:, :, 2] == 0).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        copy_rows(torch.empty(2, 3), torch.empty(3, 2))


@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("groups, tokens, run", [(2, 16380, 768), (4, 37, 768), (3, 5, 100), (1, 300, 256)])
def test_cuda_kernel_is_an_exact_copy(dtype, groups, tokens, run):
    dst, src, buf = _pack_views("cuda", dtype, groups, tokens, run)
    copy_rows(dst, src)
    assert torch.equal(dst, src)
    assert (buf[:, :, 0] == 0).all() and (buf[:, :, 2] == 0).all()  # nothing written beside dst
    # and the way back (the Ulysses unpack): group-major rows into a token-major matrix
    back = torch.zeros(tokens, groups, run, device="cuda", dtype=dtype)
    copy_rows(back.transpose(0, 1), dst)
    assert torch.equal(back.transpose(0, 1), src)


@needs_cuda_triton
def test_cuda_four_dims_that_do_not_merge():
    src = torch.randn(3, 2, 40, 64, device="cuda").transpose(0, 1)  # (2, 3, 40, 64), leading dims strided
    dst = torch.empty(2, 3, 40, 64, device="cuda")
    copy_rows(dst, src)
    assert torch.equal(dst, src)
