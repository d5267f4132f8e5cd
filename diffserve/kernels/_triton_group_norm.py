"""Triton kernels behind diffserve.kernels.group_norm (imported only when Triton is there; the reference
and the dispatch live in group_norm.py).

Why not PyTorch's kernel: its statistics pass gives each (sample, group) one thread block. A VAE decode
runs at batch 1 with 32 groups, so 32 blocks reduce up to 4M elements each on a GPU of 132 SMs — half of
the FLUX decode time went there. Here every (sample, group) is split over many programs, so the GPU fills
at any batch size, and the work is three passes over memory (read for the statistics, read + write to
normalise):

  1. stats: grid (samples * groups, splits). Each program reads one contiguous chunk of its group and
     keeps a float32 Welford state (mean, M2) per lane; the lanes are merged with the exact parallel
     formula (Chan et al.) and the chunk's (mean, M2) written to a small buffer. Welford, not sum and sum
     of squares: with |mean| >> std (activations of 100 +- 1) the latter cancels catastrophically in
     float32 over millions of elements.
  2. apply: grid (samples * channels, spatial blocks). Each program merges its group's partials (a few
     dozen numbers, always in the same order: deterministic, no atomics), then writes
     (x - mean) * rstd * weight[c] + bias[c], optionally SiLU, in float32, rounded once to x's dtype.

No host synchronisation and only stream-ordered temporaries (torch.empty), so it runs inside CUDA-graph
capture. x must be contiguous (N, C, *spatial): a group is then one contiguous run of C/G * spatial.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Programs the stats pass aims for, per SM: enough resident warps to keep the loads in flight.
_PROGRAMS_PER_SM = 8
_MAX_SPLITS = 1024
_STATS_BLOCK = 4096
_APPLY_BLOCK = 4096
_MIN_BLOCK = 128  # one element per thread of 4 warps: tiny groups and 2-D inputs get a masked tile


@triton.jit
def _group_stats_kernel(X, PMEAN, PM2, group_size, chunk, splits, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # sample * groups + group
    split = tl.program_id(1).to(tl.int64)
    start = split * chunk
    n = tl.minimum(chunk, group_size - start)  # elements of this chunk (>= 1)
    base = X + row * group_size + start
    lanes = tl.arange(0, BLOCK)
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    # Full tiles without masks: every lane has seen i values before tile i, so the Welford step divides by
    # the same scalar count on all lanes.
    n_full = n // BLOCK
    for i in range(0, n_full):
        x = tl.load(base + i * BLOCK + lanes).to(tl.float32)
        d = x - mean
        mean += d * (1.0 / (i + 1.0))
        m2 += d * (x - mean)
    # The ragged tail: only the lanes it covers take a step.
    tail = n_full * BLOCK + lanes
    in_tail = tail < n
    x = tl.load(base + tail, mask=in_tail, other=0.0).to(tl.float32)
    count = n_full.to(tl.float32) + in_tail.to(tl.float32)
    d = x - mean
    mean = tl.where(in_tail, mean + d / tl.maximum(count, 1.0), mean)
    m2 = tl.where(in_tail, m2 + d * (x - mean), m2)
    # Merge the lanes: M2 = sum of the lanes' M2 + sum of count * (lane mean - chunk mean)^2.
    chunk_mean = tl.sum(count * mean, axis=0) / n.to(tl.float32)
    dm = mean - chunk_mean
    chunk_m2 = tl.sum(m2, axis=0) + tl.sum(count * dm * dm, axis=0)
    tl.store(PMEAN + row * splits + split, chunk_mean)
    tl.store(PM2 + row * splits + split, chunk_m2)


@triton.jit
def _group_apply_kernel(
    X, Y, W, B, PMEAN, PM2,
    channels, spatial, channels_per_group, group_size, chunk, splits, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK: tl.constexpr, SPLITS_P2: tl.constexpr,
):  # fmt: skip
    nc = tl.program_id(0).to(tl.int64)  # sample * channels + channel
    blk = tl.program_id(1).to(tl.int64)
    c = nc % channels
    row = (nc // channels) * (channels // channels_per_group) + c // channels_per_group
    # The group's statistics from its chunks' partials (Chan's merge; same order in every program).
    s = tl.arange(0, SPLITS_P2)
    valid = s < splits
    pmean = tl.load(PMEAN + row * splits + s, mask=valid, other=0.0)
    pm2 = tl.load(PM2 + row * splits + s, mask=valid, other=0.0)
    count = tl.where(valid, tl.minimum(chunk, group_size - s.to(tl.int64) * chunk), 0).to(tl.float32)
    total = group_size * 1.0  # (an argument equal to 1 may come in as a constexpr: no .to())
    mean = tl.sum(count * pmean, axis=0) / total
    dm = pmean - mean
    var = (tl.sum(pm2, axis=0) + tl.sum(count * dm * dm, axis=0)) / total
    scale = tl.rsqrt(var + eps)
    if HAS_W:
        scale = scale * tl.load(W + c).to(tl.float32)
    shift = 0.0
    if HAS_B:
        shift = tl.load(B + c).to(tl.float32)

    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < spatial
    x = tl.load(X + nc * spatial + offs, mask=inside, other=0.0).to(tl.float32)
    y = (x - mean) * scale + shift
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + nc * spatial + offs, y.to(Y.dtype.element_ty), mask=inside)


@functools.cache
def _sm_count(device: torch.device) -> int:
    # Cached per device: no query (and nothing that could synchronise) on the hot path. Off CUDA (the
    # Triton interpreter in tests) an H100's count keeps the split logic exercised.
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def split_plan(rows: int, group_size: int, block: int, sm_count: int) -> tuple[int, int]:
    """(splits, chunk): each of `rows` groups of `group_size` elements is cut into `splits` chunks of `chunk`
    elements (a multiple of `block`; the last may be shorter) so that about _PROGRAMS_PER_SM programs per SM
    run, without cutting a group into chunks shorter than two tiles."""
    wanted = triton.cdiv(_PROGRAMS_PER_SM * sm_count, rows)
    splits = max(1, min(wanted, triton.cdiv(group_size, 2 * block), _MAX_SPLITS))
    chunk = triton.cdiv(triton.cdiv(group_size, splits), block) * block
    return triton.cdiv(group_size, chunk), chunk


def group_norm_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a contiguous x (N, C, *spatial) with C % num_groups == 0; x's dtype out."""
    n, c = x.shape[0], x.shape[1]
    spatial = x.numel() // (n * c)
    group_size = (c // num_groups) * spatial
    rows = n * num_groups
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)

    stats_block = min(_STATS_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(group_size)))
    splits, chunk = split_plan(rows, group_size, stats_block, _sm_count(x.device))
    pmean = torch.empty(rows, splits, device=x.device, dtype=torch.float32)
    pm2 = torch.empty(rows, splits, device=x.device, dtype=torch.float32)
    _group_stats_kernel[(rows, splits)](
        x, pmean, pm2, group_size, chunk, splits, BLOCK=stats_block, num_warps=_warps(stats_block)
    )

    apply_block = min(_APPLY_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(spatial)))
    w = weight.contiguous() if weight is not None else pmean  # pointer for an absent operand (never read)
    b = bias.contiguous() if bias is not None else pmean
    _group_apply_kernel[(n * c, triton.cdiv(spatial, apply_block))](
        x, y, w, b, pmean, pm2,
        c, spatial, c // num_groups, group_size, chunk, splits, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        BLOCK=apply_block, SPLITS_P2=max(16, triton.next_power_of_2(splits)), num_warps=_warps(apply_block),
    )  # fmt: skip
    return y
