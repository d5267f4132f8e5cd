"""Ulysses sequence parallelism: each rank holds 1/P of the image/video tokens through the whole DiT, and
around every attention call two all-to-alls trade that for all the tokens of 1/P of the heads, so
attention itself runs unchanged on every rank (DeepSpeed-Ulysses, arXiv:2309.14509).

The DiT forward marks what is sharded with `seq = shard_sequence(n_tokens, replicated_prefix=...)`,
`x = seq.shard(x, dim)` on its inputs (tokens, RoPE, per-token modulation) and `seq.gather(out, dim)` on its
output; blocks call `sequence_parallel_attention(q, k, v)` for attention over the sharded sequence. Without
an active parallel state (one process) both are no-ops and the forward is exactly the unsharded one.

Token counts that the degree does not divide are padded at the end to P * ceil(n / P). Every layer but
attention treats tokens independently, so the padded tokens only have to be kept out of attention: they are
dropped right after the all-to-all (where each rank holds the full sequence) and put back, as zeros, before
the return trip. FLUX's text tokens, which lead its joint attention, stay whole and replicated on every
rank ("replicated_prefix"): for attention each rank takes its heads' slice of them, and the text output is
all-gathered back over heads.

These are inference-only collectives (no autograd).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from diffserve.kernels.row_copy import copy_rows
from diffserve.runtime.distributed import group as pg
from diffserve.runtime.layers.attention import attention


def sequence_parallel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, fp8: bool = False
) -> torch.Tensor:
    """attention(q, k, v) over the whole sequence when this rank holds only its shard of it.

    q, k, v: (batch, prefix + local tokens, heads, head_dim), prefix being the replicated leading tokens
    declared by shard_sequence. Returns this rank's rows of the full attention output, same layout."""
    state = pg.current()
    if state is None or state.ulysses_group is None:
        return attention(q, k, v, scale=scale, fp8=fp8)
    layout, degree, group = state.layout, state.ulysses_size, state.ulysses_group
    if layout is None:
        raise RuntimeError("sequence-parallel attention outside a sharded forward (no shard_sequence call)")
    b, tokens, heads, d = q.shape
    if heads % degree:
        raise ValueError(f"{heads} attention heads cannot be split over ulysses degree {degree}")
    n, s, hp = layout.prefix, layout.local_len, heads // degree
    if tokens != n + s:
        raise RuntimeError(f"attention input has {tokens} tokens, expected {n} replicated + {s} sharded")
    qkv = (q, k, v)

    # Out: chunk j of `send` is our tokens' head group j of q, k and v, laid out (tokens, 3 * batch, ...)
    # so that what arrives, rank after rank, is (all tokens, 3 * batch, heads / degree, head_dim) with no
    # reshuffle on arrival; it lands in `joint` after the prefix rows.
    # copy_rows: each token's head group is one contiguous run on both sides (a vectorised copy on CUDA).
    send = q.new_empty(degree, s, 3 * b, hp, d)
    for i, t in enumerate(qkv):
        grouped = t[:, n:].flatten(2).unflatten(2, (degree, hp * d))  # (batch, tokens, group, run)
        for j in range(b):
            copy_rows(send[:, :, i * b + j].flatten(-2), grouped[j].transpose(0, 1))
    joint = q.new_empty(n + degree * s, 3 * b, hp, d)
    # (The same shape on both sides: torch.compile's traced all_to_all_single needs it.)
    dist.all_to_all_single(joint[n:].view(send.shape), send, group=group)
    if n:  # our heads of the replicated prefix
        mine = slice(state.ulysses_rank * hp, (state.ulysses_rank + 1) * hp)
        for i, t in enumerate(qkv):
            joint[:n, i * b : (i + 1) * b] = t[:, :n, mine].transpose(0, 1)
    # Padding rows (the end of the last shard) are dropped here, so attention never sees them. The views
    # are strided in batch and tokens, contiguous in head_dim, which the attention kernels take as is.
    out = attention(*joint[: n + layout.seq_len].transpose(0, 1).split(b), scale=scale, fp8=fp8)

    # Back: chunk j = rank j's tokens (zero rows for the padding), all of our heads; what arrives is our
    # tokens, head group after head group, written once into the result in head order.
    body = out[:, n:]
    if layout.padded_len > layout.seq_len:
        body = F.pad(body, (0, 0, 0, 0, 0, layout.padded_len - layout.seq_len))
    send = body.unflatten(1, (degree, s)).transpose(0, 1).contiguous()  # a no-op for batch 1, unpadded
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    result = out.new_empty(b, n + s, degree, hp, d)
    for j in range(b):
        copy_rows(result[j, n:].flatten(-2).transpose(0, 1), recv[:, j].flatten(-2))
    if n:  # the prefix's output, all heads, on every rank
        heads_out = out.new_empty(degree, b, n, hp, d)
        pg.all_gather_into(heads_out, out[:, :n].contiguous(), group)
        result[:, :n] = heads_out.permute(1, 2, 0, 3, 4)
    return result.flatten(2, 3)


class SequenceShards:
    """This rank's share of a sequence of `seq_len` tokens; see the module docstring."""

    def __init__(self, state: pg.ParallelState, seq_len: int, replicated_prefix: int):
        degree = state.ulysses_size
        local = -(-seq_len // degree)
        self.state = state
        self.layout = pg.SequenceLayout(seq_len, local * degree, local, replicated_prefix)
        state.layout = self.layout

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of x along `dim` (x holds all seq_len tokens there); zero-padded at the end."""
        lay = self.layout
        if x.shape[dim] != lay.seq_len:
            raise ValueError(f"cannot shard dim {dim} of {tuple(x.shape)}: expected {lay.seq_len} tokens")
        if lay.padded_len > lay.seq_len:
            pad = list(x.shape)
            pad[dim] = lay.padded_len - lay.seq_len
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        return x.narrow(dim, self.state.ulysses_rank * lay.local_len, lay.local_len)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's tokens of x along `dim`, padding removed: the unsharded tensor, on every rank."""
        lay, degree = self.layout, self.state.ulysses_size
        local = x.movedim(dim, 0).contiguous()
        out = local.new_empty((degree * lay.local_len, *local.shape[1:]))
        pg.all_gather_into(out, local, self.state.ulysses_group)
        return out[: lay.seq_len].movedim(0, dim)


class _Unsharded:
    """What shard_sequence returns when nothing is sharded: shard and gather return their input."""

    @staticmethod
    def shard(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x

    @staticmethod
    def gather(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x


UNSHARDED = _Unsharded()


def shard_sequence(seq_len: int, replicated_prefix: int = 0) -> SequenceShards | _Unsharded:
    """Start a sharded forward over seq_len tokens (plus `replicated_prefix` leading tokens in every attention
    call, kept whole). Returns the object whose shard()/gather() the forward applies to its tensors."""
    state = pg.current()
    if state is None or state.ulysses_group is None:
        return UNSHARDED
    return SequenceShards(state, seq_len, replicated_prefix)
