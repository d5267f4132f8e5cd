"""kernels.low_rank: the LoRA down- and up-projections (layers/lora.py). Off CUDA it is exactly the matmuls the layers
ran before (so CPU parity with diffusers is untouched); on CUDA the Triton kernel, split along K or not, is
held to a float64 reference, writes the join copy exactly, nothing outside its views, and replays under a
CUDA graph (its split counters set back to zero by every launch)."""

from __future__ import annotations

import pytest
import torch

from diffserve.kernels.low_rank import lora_down, lora_downs, lora_up
from tests.unit.gpu_helpers import needs_cuda_triton, rel_err


def _inputs(device, dtype, m, ks, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # strided rows (a view of a wider matrix), as the layers pass h out of a wide buffer
    parts = [torch.randn(m, k + 8, generator=g)[:, :k].to(device, dtype) for k in ks]
    a = (torch.randn(n, sum(ks), generator=g) / sum(ks) ** 0.5).to(device, dtype)
    return parts, a


def test_cpu_is_the_matmuls():
    parts, a = _inputs("cpu", torch.float32, 37, [48, 80], 24)
    out = torch.full((37, 24), float("nan"))
    assert lora_down(parts, a, out) is out
    assert torch.equal(out, (parts[0] @ a[:, :48].t()).addmm_(parts[1], a[:, 48:].t()))
    wide = torch.zeros(37, 48 + 24 + 3)
    lora_down(parts[:1], a[:, :48], wide[:, 48:72], copy_to=wide[:, :48])
    assert torch.equal(wide[:, :48], parts[0]) and torch.equal(wide[:, 48:72], parts[0] @ a[:, :48].t())
    assert (wide[:, 72:] == 0).all()


def test_bad_shapes_are_errors():
    parts, a = _inputs("cpu", torch.float32, 5, [16], 4)
    with pytest.raises(ValueError, match="lora_down"):
        lora_down(parts, a, torch.empty(5, 3))
    with pytest.raises(ValueError, match="copy_to"):
        lora_down(parts, a, torch.empty(5, 4), copy_to=torch.empty(5, 15))


# Bounds: bf16 output rounded once (at most 2^-8 relative per element; 1.7e-3 on the norm, the rounding of
# the float64 products alone at these shapes, H200 check 2026-12-04) after a float32 sum of K products
# (K * 2^-24, < 1e-3 at K = 15,360): 4e-3 on the norm. float32 in float32 (ieee dot): the sum's rounding, K * 2^-24 at
# most, well below 1e-5 at these K.
TOL = {torch.bfloat16: 4e-3, torch.float32: 1e-5}


@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "m, ks, n, block_m, split",
    [
        (4096, [3072], 96, None, None),  # FLUX.1-dev q|k|v, one rank-32 adapter: split along K
        (4608, [3072, 12288], 32, None, None),  # the single block's output projection, two parts
        (512, [3072], 64, 16, 1),
        (300, [1000], 200, 64, 3),  # two N tiles, ragged M and K
        (17, [130, 70], 17, None, 5),  # more splits than k-steps: empty programs still count in
        (32760, [1536], 32, None, None),  # a Wan2.1-1.3B video's rows: K unsplit (enough row tiles)
        (4608, [3072], 32, None, None),  # FLUX's single-block MLP input: 32-wide tiles, K split, the join
        # The join with two rank-32 adapters: 4.2e-2 off in bf16 while the join stored the dot's operand
        # (_triton_low_rank.py, COPY); 32760x1536x32 above was 4.6e-3 off then
        (4096, [3072], 64, None, None),
    ],
)
def test_cuda_kernel_matches_float64(dtype, m, ks, n, block_m, split):
    from diffserve.kernels._triton_low_rank import lora_down_triton

    parts, a = _inputs("cuda", dtype, m, ks, n)
    ref = sum(p.double() @ a_part.double().t() for p, a_part in zip(parts, a.split(ks, dim=1), strict=True))
    copy = len(ks) == 1
    wide = torch.zeros(m, ks[0] + n + 8, device="cuda", dtype=dtype)
    out = wide[:, ks[0] : ks[0] + n]
    for _ in range(2):  # the counters left at zero: a second launch is as right as the first
        wide.zero_()
        lora_down_triton(parts, a, out, wide[:, : ks[0]] if copy else None, block_m=block_m, split=split)
        assert rel_err(out, ref) < TOL[dtype]
        if copy:
            assert torch.equal(wide[:, : ks[0]], parts[0])
        assert (wide[:, ks[0] + n :] == 0).all()


def _job(device, dtype, m, k, n, join, seed):
    (x,), a = _inputs(device, dtype, m, [k], n, seed=seed)
    wide = torch.zeros(m, k + n + 8, device=device, dtype=dtype)
    return (x, a, wide[:, k : k + n], wide[:, :k] if join else None), wide


def test_cpu_lora_downs_is_each_lora_down():
    jobs = [
        _job("cpu", torch.float32, m, 40, 8, join, seed) for m, join, seed in ((9, True, 1), (5, True, 2))
    ]
    lora_downs([j for j, _ in jobs])
    for (x, a, out, _), wide in jobs:
        assert torch.equal(out, x @ a.t()) and torch.equal(wide[:, :40], x) and (wide[:, 48:] == 0).all()


@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "ms, k, n, join, block_m, split",
    [
        ((4096, 512), 3072, 32, True, None, None),  # FLUX.1-dev's dual block: image and text to_out joins
        ((4096, 512), 12288, 32, False, None, None),  # its MLP outputs, K split
        ((300, 77), 1000, 48, True, 64, 3),  # ragged rows and K
        ((512, 4096), 3072, 64, False, 16, 1),  # the smaller job first, unsplit
    ],
)
def test_cuda_paired_launch_matches_float64(dtype, ms, k, n, join, block_m, split):
    """lora_downs' two jobs in one launch (the second's tiles after the first's): each as right as alone, its
    join exact, nothing written outside its views, twice (the split counters back at zero)."""
    from diffserve.kernels._triton_low_rank import lora_down_triton

    jobs = [_job("cuda", dtype, m, k, n, join, seed) for m, seed in zip(ms, (1, 2), strict=True)]
    for _ in range(2):
        for _, wide in jobs:
            wide.zero_()
        lora_down_triton([jobs[0][0][0]], *jobs[0][0][1:], block_m=block_m, split=split, pair=jobs[1][0])
        for (x, a, out, _), wide in jobs:
            assert rel_err(out, x.double() @ a.double().t()) < TOL[dtype]
            assert torch.equal(wide[:, :k], x) if join else (wide[:, :k] == 0).all()
            assert (wide[:, k + n :] == 0).all()


@needs_cuda_triton
def test_cuda_graph_replays_paired_launches():
    jobs = [_job("cuda", torch.bfloat16, m, 3072, 32, True, seed) for m, seed in ((4096, 1), (512, 2))]
    lora_downs([j for j, _ in jobs])  # eager first: the counters exist before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_downs([j for j, _ in jobs])
    for seed in (3, 4):
        for (x, *_), m in zip((j for j, _ in jobs), (4096, 512), strict=True):
            x.copy_(_inputs("cuda", torch.bfloat16, m, [3072], 32, seed=seed)[0][0])
        graph.replay()
        torch.cuda.synchronize()
        for (x, a, out, _), wide in jobs:
            assert rel_err(out, x.double() @ a.double().t()) < TOL[torch.bfloat16]
            assert torch.equal(wide[:, :3072], x)


@needs_cuda_triton
def test_cuda_graph_replays_the_split_kernel():
    parts, a = _inputs("cuda", torch.bfloat16, 4096, [3072], 32)
    out = torch.empty(4096, 32, device="cuda", dtype=torch.bfloat16)
    lora_down(parts, a, out)  # eager first: the counters exist before capture
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_down(parts, a, out)
    for seed in (1, 2):
        new, _ = _inputs("cuda", torch.bfloat16, 4096, [3072], 32, seed=seed)
        parts[0].copy_(new[0])
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, parts[0].double() @ a.double().t()) < TOL[torch.bfloat16]
    assert not torch.equal(out, eager)


def test_cpu_up_projection_is_the_addmm():
    y, t, bt = torch.randn(37, 40), torch.randn(37, 6), torch.randn(6, 40)
    expect = y.clone().addmm_(t, bt)
    assert lora_up(y, t, bt) is y and torch.equal(y, expect)
    with pytest.raises(ValueError, match="lora_up"):
        lora_up(y, t, bt[:, :5])


# y += t B^T: y read in its dtype, the product summed in float32 (R <= 96 terms: ~1e-5 relative at most)
# and added before one rounding: bf16 2^-9 relative per element (4e-3 on the norm as above); float32 1e-5.
@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m, n, r", [(4608, 3072, 32), (512, 3072, 96), (300, 200, 17)])
def test_cuda_up_projection_matches_float64(dtype, m, n, r):
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(m, n + 64, generator=g).to("cuda", dtype)
    y, before = buf[:, :n], buf.clone()
    t = torch.randn(m, r, generator=g).to("cuda", dtype)
    bt = (torch.randn(r, n, generator=g) * 0.3).to("cuda", dtype)
    ref = y.double() + t.double() @ bt.double()
    lora_up(y, t, bt)
    assert rel_err(y, ref) < TOL[dtype]
    assert torch.equal(buf[:, n:], before[:, n:])  # nothing written beside y
