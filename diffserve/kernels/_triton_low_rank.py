"""The LoRA down-projection kernel of kernels/low_rank.py, imported only when Triton is there.

t (M, N) = [x1 | x2] @ A^T with N small (slots x rank) and K large: the work is reading x once. A grid of
M-tiles alone leaves most of the H200's 132 SMs idle (4096 rows / 64 = 64 programs), so K is split too:
program (tile, s) multiplies columns [s*chunk, (s+1)*chunk) of each input and leaves its float32 partial
in a workspace; the last of a tile's SPLIT programs to arrive (an atomic counter per tile) sums the
partials, writes t rounded once, and sets the counter back to 0 for the next launch (so CUDA graphs replay
it as is). With COPY the programs also store the x1 tile they loaded into C: the join of a K-append input
[x | t] made in the same pass.

Counters: one zeroed int32 buffer per device, made outside graph capture (a zeroing captured into a graph
would not run eagerly); a launch during capture that would need a larger one runs unsplit instead. The
launches of one device share it, so they must run in stream order: one worker drives each GPU.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_BLOCK_K = 128
_SMEM = 200 << 10  # shared memory a program's stages may take (an H100/H200 SM has 228 KB)
_SMEM_SM = 228 << 10
_MIN_COUNTERS = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _tiles(x_rows, a_cols, k, hi, row_in, col_in, EVEN_K: tl.constexpr):
    """The (BLOCK_M, BLOCK_K) tile of x and (BLOCK_K, BLOCK_N) tile of A^T at columns k. EVEN_K (K a
    multiple of BLOCK_K, so every chunk is whole k-steps): no mask along k, which lets the loads vectorise
    (a mask varying along the contiguous dim makes them element by element)."""
    if EVEN_K:
        x = tl.load(x_rows + k[None, :], mask=row_in, other=0.0)
        a = tl.load(a_cols + k[:, None], mask=col_in, other=0.0)
    else:
        x = tl.load(x_rows + k[None, :], mask=row_in & (k < hi)[None, :], other=0.0)
        a = tl.load(a_cols + k[:, None], mask=(k < hi)[:, None] & col_in, other=0.0)
    return x, a


@triton.jit(do_not_specialize=["M", "M_B"])
def _lora_down_kernel(
    X1, X2, A, T, C, WS, LOCK,
    M, N, K1, K2, x1_row, x2_row, t_row, c_row, chunk1, chunk2,
    X1_B, A_B, T_B, C_B, M_B, x1_row_b, t_row_b, c_row_b, tiles_a,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TWO: tl.constexpr, COPY: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
    PAIR: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)  # the workspace and counter index, over both jobs of a PAIR
    s = tl.program_id(1)
    local = tile
    if PAIR:  # the tiles from tiles_a on are the second job's (same N, K and split; its own rows)
        if tile >= tiles_a:
            X1, A, T, C, M = X1_B, A_B, T_B, C_B, M_B
            x1_row, t_row, c_row = x1_row_b, t_row_b, c_row_b
            local = tile - tiles_a
    n_blocks = tl.cdiv(N, BLOCK_N)
    rm = (local // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (local % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_in = (rm < M)[:, None]
    col_in = (rn < N)[None, :]
    rows = rm.to(tl.int64)[:, None]
    a_cols = A + rn.to(tl.int64)[None, :] * (K1 + K2)  # A is (N, K1 + K2), contiguous
    copy_in = (rm < tl.where(local % n_blocks == 0, M, 0))[:, None]  # rows this program copies (COPY)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lo = s * chunk1
    hi = tl.minimum(lo + chunk1, K1)
    for k0 in range(lo, hi, BLOCK_K):
        k = k0 + rk
        x, a = _tiles(X1 + rows * x1_row, a_cols, k, hi, row_in, col_in, EVEN_K)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
        # COPY: one N-tile's programs write the join (N > BLOCK_N: the first), from a load of their own. Storing
        # the x that feeds tl.dot made the pipelined loop compute wrong products on the H200 (bf16: 4.2e-2
        # relative at 4096x3072x64, 4.6e-3 at 32760x1536x32, every launch; float32 and the interpreter right;
        # the copy itself exact), as in Triton #8139, a pipelined load also used outside the dot. With this
        # second load (from L2: .cg) 40 launches of each were right (tests/unit/test_low_rank.py has both
        # shapes), for +1.6 us at 4096x3072x32 (20.1 against 18.5, benchmarks/lora_down_rates.py).
        if COPY:
            in_k = copy_in if EVEN_K else copy_in & (k < hi)[None, :]  # (EVEN_K: vector accesses, as _tiles)
            x = tl.load(X1 + rows * x1_row + k[None, :], mask=in_k, cache_modifier=".cg")
            tl.store(C + rows * c_row + k[None, :], x, mask=in_k)
    if TWO:
        lo = s * chunk2
        hi = tl.minimum(lo + chunk2, K2)
        for k0 in range(lo, hi, BLOCK_K):
            k = k0 + rk
            x, a = _tiles(X2 + rows * x2_row, a_cols + K1, k, hi, row_in, col_in, EVEN_K)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
    out_ptr = T + rows * t_row + rn[None, :]
    if SPLIT == 1:
        tl.store(out_ptr, acc.to(T.dtype.element_ty), mask=row_in & col_in)
    else:
        tile_elems = BLOCK_M * BLOCK_N
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(WS + (tile * SPLIT + s).to(tl.int64) * tile_elems + offs, acc)
        tl.debug_barrier()  # every thread's partial stored before the counter says so (release, gpu scope)
        arrived = tl.atomic_add(LOCK + tile, 1)
        if arrived == SPLIT - 1:  # the last of the tile's programs: the others' partials are all there
            for j in range(SPLIT):
                if j != s:  # .cg: read at L2, where the other SMs' stores are (L1 may hold a stale line)
                    ptr = WS + (tile * SPLIT + j).to(tl.int64) * tile_elems + offs
                    acc += tl.load(ptr, cache_modifier=".cg")
            tl.store(out_ptr, acc.to(T.dtype.element_ty), mask=row_in & col_in)
            tl.atomic_xchg(LOCK + tile, 0)


def _config(m: int, n: int, k: int, elem: int, sms: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, stages, split) by the sweep of benchmarks/lora_down_rates.py (H200, 2026-12-04):
    4 stages of 128-wide k-steps, and K split so that all programs are resident at once (one wave: a
    second wave measured slower, e.g. 21.1 against 15.9 us at 4096x3072x96), each keeping four or more
    k-steps of x to stream (fewer and the partials' traffic outweighs the parallelism)."""
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_m = 64 if m >= 1024 else 32
    stages = max(2, min(4, _SMEM // ((block_m + block_n) * _BLOCK_K * elem)))
    resident = max(1, _SMEM_SM // (stages * (block_m + block_n) * _BLOCK_K * elem))
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    most = min(k // (4 * _BLOCK_K), 16)
    # At least 2 where K allows, and 32-row tiles where it does not: set when a wrong bf16 case was seen
    # (K unsplit, 64-row tiles, with the join) before its cause, the join's store of the dot's operand
    # (COPY above), was found; kept, as the configurations the GPU tests passed.
    split = max(1, min(2, most), min(resident * sms // tiles, most))
    if split == 1:  # K too short to split: 32-row tiles (not the Hopper wgmma path the wrong case took)
        block_m = 32
    return block_m, block_n, stages, split


def _counters_for(device: torch.device, tiles: int) -> torch.Tensor | None:
    lock = _counters.get(device)
    if lock is not None and lock.numel() >= tiles:
        return lock
    if torch.cuda.is_current_stream_capturing():
        return None
    lock = torch.zeros(max(tiles, _MIN_COUNTERS), dtype=torch.int32, device=device)
    _counters[device] = lock
    return lock


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def lora_down_triton(
    parts,
    a,
    out,
    copy_to,
    block_m=None,
    split=None,
    block_k=_BLOCK_K,
    num_warps=4,
    num_stages=None,
    pair=None,
):
    """kernels/low_rank.lora_down on CUDA: parts one or two (M, K_i) views, last dim contiguous; a (N, K)
    contiguous; out (M, N) and copy_to (M, K_0) views with their last dim contiguous. pair: a second
    job (x, a, out, copy_to) of one part, the same N, K and dtype, copy_to given or not as this one's,
    run in the same launch (after this job's tiles). block_m, split and the rest override the choices of
    _config (benchmarks/lora_down_rates.py sweeps them)."""
    x1 = parts[0]
    x2 = parts[1] if len(parts) > 1 else x1
    m, n = out.shape
    k1 = x1.shape[1]
    k2 = parts[1].shape[1] if len(parts) > 1 else 0
    m_b = pair[2].shape[0] if pair is not None else 0
    bm, block_n, stages, sp = _config(m + m_b, n, k1 + k2, a.element_size(), _sms(out.device))
    block_m = block_m or bm
    split = split or sp
    num_stages = num_stages or stages
    tiles_a = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    tiles = tiles_a + triton.cdiv(m_b, block_m) * triton.cdiv(n, block_n)
    lock = _counters_for(out.device, tiles) if split > 1 else None
    if lock is None:
        split, lock = 1, out  # unused
    ws = torch.empty(
        tiles * split * block_m * block_n if split > 1 else 1, dtype=torch.float32, device=out.device
    )

    def chunk(k: int) -> int:
        return triton.cdiv(triton.cdiv(k, split), block_k) * block_k

    c = copy_to if copy_to is not None else out
    if pair is None:
        xb, ab, tb, cb = x1, a, out, c  # unread
    else:
        xb, ab, tb, cb = pair
        cb = cb if cb is not None else tb
    _lora_down_kernel[(tiles, split)](
        x1, x2, a, out, c, ws, lock,
        m, n, k1, k2, x1.stride(0), x2.stride(0), out.stride(0), c.stride(0),
        chunk(k1), chunk(max(k2, 1)),
        xb, ab, tb, cb, m_b, xb.stride(0), tb.stride(0), cb.stride(0), tiles_a,
        SPLIT=split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        TWO=len(parts) > 1, COPY=copy_to is not None, num_warps=num_warps, num_stages=num_stages,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # float32 in float32, as torch's matmul
        EVEN_K=k1 % block_k == 0 and k2 % block_k == 0, PAIR=pair is not None,
    )  # fmt: skip


@triton.jit
def _lora_up_kernel(
    Y, T, B, M, N, R, y_row, t_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    rm = (pid // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = rm.to(tl.int64)[:, None]
    row_in = (rm < M)[:, None]
    # EVEN_N / EVEN_R: no mask along a contiguous dim, so the accesses vectorise
    if EVEN_N:
        y_in = row_in
    else:
        y_in = row_in & (rn < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        if EVEN_R:
            t = tl.load(T + rows * t_row + rr[None, :], mask=row_in, other=0.0)
        else:
            t = tl.load(T + rows * t_row + rr[None, :], mask=row_in & (rr < R)[None, :], other=0.0)
        b_in = (rr < R)[:, None] & (rn < N)[None, :]
        b = tl.load(B + rr.to(tl.int64)[:, None] * N + rn[None, :], mask=b_in, other=0.0)
        acc = tl.dot(t, b, acc, input_precision=PRECISION)
    ptr = Y + rows * y_row + rn[None, :]
    y = tl.load(ptr, mask=y_in, other=0.0).to(tl.float32)
    tl.store(ptr, (y + acc).to(Y.dtype.element_ty), mask=y_in)


def lora_up_triton(y: torch.Tensor, t: torch.Tensor, bt: torch.Tensor) -> None:
    """kernels/low_rank.lora_up on CUDA: y (M, N) += t (M, R) @ bt (R, N) in place, one rounding; y and t
    views with their last dim contiguous, bt contiguous."""
    m, n = y.shape
    r = t.shape[1]
    block_n = 128
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    block_m = 64 if m >= 1024 else 32
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _lora_up_kernel[grid](
        y, t, bt, m, n, r, y.stride(0), t.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        EVEN_N=n % block_n == 0, EVEN_R=r % block_r == 0,
        PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )  # fmt: skip
