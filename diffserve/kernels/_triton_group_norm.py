"""Triton kernels behind diffserve.kernels.group_norm (imported only when Triton is there; the reference,
the dispatch and the choice of layout live in group_norm.py).

Why not PyTorch's kernel: its statistics pass gives each (sample, group) one thread block. A VAE decode
runs at batch 1 with 32 groups, so 32 blocks reduce up to 4M elements each on a GPU of 132 SMs — half of
the FLUX decode time went there. Here every (sample, group) is split over many programs, so the GPU fills
at any batch size. Statistics are float32 Welford states (mean, M2) merged with the exact parallel formula
(Chan et al.), not sums and sums of squares: with |mean| >> std (activations of 100 +- 1) the latter
cancels catastrophically in float32 over millions of elements. Partials are merged in a fixed order (no
atomics: deterministic), with no host synchronisation and only stream-ordered temporaries (torch.empty),
so everything runs inside CUDA-graph capture. An optional per-channel input_bias normalises x + input_bias
without writing it (a conv's bias, run without it: see group_norm.py). Two memory layouts:

Contiguous (N, C, *spatial), group_norm_triton: a group is one contiguous run of C/G * spatial.
  1. stats: grid (samples * groups, splits); each program reduces one contiguous chunk of its group.
  2. apply: grid (samples * channels, spatial blocks); each program merges its group's partials (a few
     dozen numbers) and writes (x - mean) * rstd * weight[c] + bias[c], optionally SiLU, in float32,
     rounded once to x's dtype.

Channels last ((N, *spatial, C) in memory: channels_last, channels_last_3d), group_norm_channels_last: a
group is a run of C/G channels inside every pixel's C, so programs read [pixels x channels] tiles whose
rows are contiguous, and every element's channel is its column.
  1. stats: grid (samples * channel blocks, splits); each program keeps per-column Welford states over a
     chunk of pixels and writes one (mean, M2) per channel.
  2. finalize: grid (samples * groups); merges a group's chunks x channels into its mean and rstd, and
     writes each channel's mean and rstd * weight[c] (a few KB).
  3. apply: grid (pixel blocks, samples * channel blocks); tiles of contiguous pixel rows, normalised with
     the per-channel vectors loaded once per program.
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
_MAX_BLOCK_C = 1024  # channels per channels-last tile; wider tensors get several channel blocks
_FINALIZE_TILE = 2048  # (chunks x channels of a group) per step of the finalize loops


@triton.jit
def _group_stats_kernel(
    X, IB, PMEAN, PM2, group_size, chunk, splits, spatial, channels_per_group, groups,
    HAS_IB: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # sample * groups + group
    split = tl.program_id(1).to(tl.int64)
    start = split * chunk
    n = tl.minimum(chunk, group_size - start)  # elements of this chunk (>= 1)
    base = X + row * group_size + start
    lanes = tl.arange(0, BLOCK)
    # input_bias: a chunk spans channels, so every element looks up its own (the group's first channel +
    # its offset in the group // spatial). Not the hot path: the CUDA decode runs channels last.
    ib = IB + (row % groups) * channels_per_group
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    # Full tiles without masks: every lane has seen i values before tile i, so the Welford step divides by
    # the same scalar count on all lanes.
    n_full = n // BLOCK
    for i in range(0, n_full):
        x = tl.load(base + i * BLOCK + lanes).to(tl.float32)
        if HAS_IB:
            x += tl.load(ib + (start + i * BLOCK + lanes) // spatial).to(tl.float32)
        d = x - mean
        mean += d * (1.0 / (i + 1.0))
        m2 += d * (x - mean)
    # The ragged tail: only the lanes it covers take a step.
    tail = n_full * BLOCK + lanes
    in_tail = tail < n
    x = tl.load(base + tail, mask=in_tail, other=0.0).to(tl.float32)
    if HAS_IB:
        x += tl.load(ib + (start + tail) // spatial, mask=in_tail, other=0.0).to(tl.float32)
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
    X, Y, W, B, IB, PMEAN, PM2,
    channels, spatial, channels_per_group, group_size, chunk, splits, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr, SILU: tl.constexpr,
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
    if HAS_IB:  # (x + ib) - mean as x - (mean - ib): the bias folded into this channel's mean
        mean = mean - tl.load(IB + c).to(tl.float32)
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
    input_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a contiguous x (N, C, *spatial) with C % num_groups == 0, of x + input_bias
    (per channel, added in float32) when given; x's dtype out."""
    n, c = x.shape[0], x.shape[1]
    spatial = x.numel() // (n * c)
    group_size = (c // num_groups) * spatial
    rows = n * num_groups
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)

    stats_block = min(_STATS_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(group_size)))
    splits, chunk = split_plan(rows, group_size, stats_block, _sm_count(x.device))
    pmean = torch.empty(rows, splits, device=x.device, dtype=torch.float32)
    pm2 = torch.empty(rows, splits, device=x.device, dtype=torch.float32)
    ib = input_bias.contiguous() if input_bias is not None else pmean  # (pointer never read when absent)
    _group_stats_kernel[(rows, splits)](
        x, ib, pmean, pm2, group_size, chunk, splits, spatial, c // num_groups, num_groups,
        HAS_IB=input_bias is not None, BLOCK=stats_block, num_warps=_warps(stats_block),
    )  # fmt: skip

    apply_block = min(_APPLY_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(spatial)))
    w = weight.contiguous() if weight is not None else pmean  # pointer for an absent operand (never read)
    b = bias.contiguous() if bias is not None else pmean
    _group_apply_kernel[(n * c, triton.cdiv(spatial, apply_block))](
        x, y, w, b, ib, pmean, pm2,
        c, spatial, c // num_groups, group_size, chunk, splits, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_IB=input_bias is not None, SILU=silu,
        BLOCK=apply_block, SPLITS_P2=max(16, triton.next_power_of_2(splits)), num_warps=_warps(apply_block),
    )  # fmt: skip
    return y


# ---------------------------------------------------------------- channels last: (N, *spatial, C) in memory


@triton.jit
def _cl_stats_kernel(
    X, PMEAN, PM2, channels, pixels, chunk, splits, cblocks,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # sample * cblocks + channel block
    split = tl.program_id(1).to(tl.int64)
    n = (row // cblocks).to(tl.int64)
    ch = (row % cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < channels
    start = split * chunk
    cnt = tl.minimum(chunk, pixels - start)  # pixels of this chunk (>= 1)
    p = tl.arange(0, BLOCK_P)
    ptrs = X + (n * pixels + start) * channels + p[:, None] * channels + ch[None, :]
    mean = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # Full tiles: every lane has seen i values before tile i (one Welford step with a scalar count), and
    # without a channel mask when the blocks tile C exactly, so the row loads vectorise.
    n_full = cnt // BLOCK_P
    for i in range(0, n_full):
        if EVEN_C:
            x = tl.load(ptrs).to(tl.float32)
        else:
            x = tl.load(ptrs, mask=ch_ok[None, :], other=0.0).to(tl.float32)
        d = x - mean
        mean += d * (1.0 / (i + 1.0))
        m2 += d * (x - mean)
        ptrs += BLOCK_P * channels  # (a 64-bit pointer step: chunk * channels may pass 2**31)
    # The ragged tail of pixels: only the rows it covers take a step.
    in_tail = n_full * BLOCK_P + p < cnt
    x = tl.load(ptrs, mask=in_tail[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
    count = (n_full.to(tl.float32) + in_tail.to(tl.float32))[:, None]
    d = x - mean
    mean = tl.where(in_tail[:, None], mean + d / tl.maximum(count, 1.0), mean)
    m2 = tl.where(in_tail[:, None], m2 + d * (x - mean), m2)
    # Merge the rows of each column (channel): the chunk's per-channel (mean, M2).
    chunk_mean = tl.sum(count * mean, axis=0) / cnt.to(tl.float32)
    dm = mean - chunk_mean[None, :]
    chunk_m2 = tl.sum(m2, axis=0) + tl.sum(count * dm * dm, axis=0)
    out = (n * splits + split) * channels + ch
    tl.store(PMEAN + out, chunk_mean, mask=ch_ok)
    tl.store(PM2 + out, chunk_m2, mask=ch_ok)


@triton.jit
def _cl_finalize_kernel(
    PMEAN, PM2, W, IB, MEAN, SCALE, channels, pixels, channels_per_group, chunk, splits, eps,
    HAS_W: tl.constexpr, HAS_IB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # sample * groups + group
    groups = channels // channels_per_group
    n = row // groups
    j = tl.arange(0, BLOCK_G)
    c_ok = j < channels_per_group
    c = (row % groups) * channels_per_group + j
    base = PMEAN + n * splits * channels
    base2 = PM2 + n * splits * channels
    total = pixels * 1.0 * channels_per_group  # (float first: may pass 2**31; either may be a constexpr 1)
    # input_bias: the partials are per channel, so x + ib only moves each channel's chunk means by ib[c]
    # (the M2s are shift-invariant): added here, and the stats and apply passes never see it.
    ib = tl.zeros([BLOCK_G], dtype=tl.float32)
    if HAS_IB:
        ib = tl.load(IB + c, mask=c_ok, other=0.0).to(tl.float32)
    # Two passes over the partials, in the same order in every run: the group mean, then its M2 (Chan's
    # merge: sum of the M2s + sum of count * (chunk mean - group mean)^2, every chunk of every channel).
    acc = tl.zeros([BLOCK_S, BLOCK_G], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = (s < splits)[:, None] & c_ok[None, :]
        count = tl.minimum(chunk, pixels - s.to(tl.int64) * chunk).to(tl.float32)[:, None]
        pm = tl.load(base + s[:, None] * channels + c[None, :], mask=ok, other=0.0) + ib[None, :]
        acc += tl.where(ok, count * pm, 0.0)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
    acc = tl.zeros([BLOCK_S, BLOCK_G], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = (s < splits)[:, None] & c_ok[None, :]
        count = tl.minimum(chunk, pixels - s.to(tl.int64) * chunk).to(tl.float32)[:, None]
        offs = s[:, None] * channels + c[None, :]
        pm = tl.load(base + offs, mask=ok, other=0.0) + ib[None, :]
        pm2 = tl.load(base2 + offs, mask=ok, other=0.0)
        dm = pm - mean
        acc += tl.where(ok, pm2 + count * dm * dm, 0.0)
    rstd = tl.rsqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / total + eps)
    scale = tl.zeros([BLOCK_G], dtype=tl.float32) + rstd
    if HAS_W:
        scale = scale * tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    # The apply pass reads x, not x + ib: (x + ib) - mean = x - (mean - ib).
    tl.store(MEAN + n * channels + c, mean - ib, mask=c_ok)
    tl.store(SCALE + n * channels + c, scale, mask=c_ok)


@triton.jit
def _cl_apply_kernel(
    X, Y, MEAN, SCALE, B, channels, pixels, cblocks,
    HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    EVEN_C: tl.constexpr,
):  # fmt: skip
    # Pixel blocks on grid axis 0 (up to 2**31 - 1): a 2048x2048 image has 2**17 of them, past axis 1's 65535.
    blk = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)  # sample * cblocks + channel block
    n = (row // cblocks).to(tl.int64)
    ch = (row % cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < channels
    mean = tl.load(MEAN + n * channels + ch, mask=ch_ok, other=0.0)[None, :]
    scale = tl.load(SCALE + n * channels + ch, mask=ch_ok, other=0.0)[None, :]
    shift = 0.0
    if HAS_B:
        shift = tl.load(B + ch, mask=ch_ok, other=0.0).to(tl.float32)[None, :]
    p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    offs = (n * pixels + p)[:, None] * channels + ch[None, :]
    if EVEN_C:  # a mask constant along the rows: the loads and stores vectorise
        inside = (p < pixels)[:, None]
    else:
        inside = (p < pixels)[:, None] & ch_ok[None, :]
    x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
    y = (x - mean) * scale + shift
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inside)


def group_norm_channels_last(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    input_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm (+ SiLU) of x (N, C, *spatial) laid out channels last (x.movedim(1, -1) contiguous), with
    C % num_groups == 0, of x + input_bias (per channel, in float32) when given; the output has x's
    strides and dtype."""
    n, c = x.shape[0], x.shape[1]
    pixels = x.numel() // (n * c)
    y = torch.empty_like(x)  # dense x: preserve_format gives it x's strides
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(c))
    cblocks = triton.cdiv(c, block_c)
    even_c = c % block_c == 0

    stats_p = max(1, min(_STATS_BLOCK // block_c, triton.next_power_of_2(pixels)))
    # Chunks of at least four tiles: every chunk writes (and the finalize reads) 2 floats per channel, so
    # shorter chunks would add a sizeable fraction of the input's traffic.
    splits, chunk = split_plan(n * cblocks, pixels, 2 * stats_p, _sm_count(x.device))
    pmean = torch.empty(n, splits, c, device=x.device, dtype=torch.float32)
    pm2 = torch.empty(n, splits, c, device=x.device, dtype=torch.float32)
    _cl_stats_kernel[(n * cblocks, splits)](
        x, pmean, pm2, c, pixels, chunk, splits, cblocks,
        BLOCK_P=stats_p, BLOCK_C=block_c, EVEN_C=even_c, num_warps=_warps(stats_p * block_c),
    )  # fmt: skip

    mean = torch.empty(n, c, device=x.device, dtype=torch.float32)
    scale = torch.empty(n, c, device=x.device, dtype=torch.float32)
    cpg = c // num_groups
    block_g = triton.next_power_of_2(cpg)
    block_s = max(1, min(triton.next_power_of_2(splits), _FINALIZE_TILE // block_g))
    w = weight.contiguous() if weight is not None else pmean  # pointer for an absent operand (never read)
    ib = input_bias.contiguous() if input_bias is not None else pmean
    _cl_finalize_kernel[(n * num_groups,)](
        pmean, pm2, w, ib, mean, scale, c, pixels, cpg, chunk, splits, eps,
        HAS_W=weight is not None, HAS_IB=input_bias is not None, BLOCK_S=block_s, BLOCK_G=block_g,
        num_warps=4,
    )  # fmt: skip

    apply_p = max(1, min(_APPLY_BLOCK // block_c, triton.next_power_of_2(pixels)))
    b = bias.contiguous() if bias is not None else mean
    _cl_apply_kernel[(triton.cdiv(pixels, apply_p), n * cblocks)](
        x, y, mean, scale, b, c, pixels, cblocks,
        HAS_B=bias is not None, SILU=silu, BLOCK_P=apply_p, BLOCK_C=block_c, EVEN_C=even_c,
        num_warps=_warps(apply_p * block_c),
    )  # fmt: skip
    return y
