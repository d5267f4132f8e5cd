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

from diffserve.runtime.distributed import group as pg
from diffserve.runtime.layers.attention import attention


def seq_to_heads(x: torch.Tensor, group, degree: int) -> torch.Tensor:
    """(L, s, H, d) with this rank's s tokens -> (L, degree * s, H / degree, d): every rank's tokens, this
    rank's heads. L is any batch of leading rows (here q, k, v stacked times the batch)."""
    rows, s, heads, d = x.shape
    hp = heads // degree
    send = x.reshape(rows, s, degree, hp, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j -> rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens, our heads
    return recv.permute(1, 0, 2, 3, 4).reshape(rows, degree * s, hp, d)


def heads_to_seq(x: torch.Tensor, group, degree: int) -> torch.Tensor:
    """The inverse of seq_to_heads: (L, degree * s, H / degree, d) -> (L, s, H, d)."""
    rows, n, hp, d = x.shape
    s = n // degree
    send = x.reshape(rows, degree, s, hp, d).permute(1, 0, 2, 3, 4).contiguous()  # token chunk j -> rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: our tokens, rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(rows, s, degree * hp, d)


def gather_heads(x: torch.Tensor, group, degree: int) -> torch.Tensor:
    """(B, n, H / degree, d) on each rank -> (B, n, H, d) on every rank (heads in rank order)."""
    out = x.new_empty((degree, *x.shape))
    pg.all_gather_into(out, x.contiguous(), group)
    b, n, hp, d = x.shape
    return out.permute(1, 2, 0, 3, 4).reshape(b, n, degree * hp, d)


def sequence_parallel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """attention(q, k, v) over the whole sequence when this rank holds only its shard of it.

    q, k, v: (batch, prefix + local tokens, heads, head_dim), prefix being the replicated leading tokens
    declared by shard_sequence. Returns this rank's rows of the full attention output, same layout."""
    state = pg.current()
    if state is None or state.ulysses_group is None:
        return attention(q, k, v, scale=scale)
    layout, degree, group = state.layout, state.ulysses_size, state.ulysses_group
    if layout is None:
        raise RuntimeError("sequence-parallel attention outside a sharded forward (no shard_sequence call)")
    heads = q.shape[2]
    if heads % degree:
        raise ValueError(f"{heads} attention heads cannot be split over ulysses degree {degree}")
    n, hp, b = layout.prefix, heads // degree, q.shape[0]
    if q.shape[1] != n + layout.local_len:
        raise RuntimeError(
            f"attention input has {q.shape[1]} tokens, expected {n} replicated + {layout.local_len} sharded"
        )
    # One all-to-all for q, k and v together: stacked as (3 * batch, tokens, heads, head_dim).
    qkv = torch.cat([q[:, n:], k[:, n:], v[:, n:]])
    qkv = seq_to_heads(qkv, group, degree)[:, : layout.seq_len]  # the padding leaves here
    if n:
        mine = slice(state.ulysses_rank * hp, (state.ulysses_rank + 1) * hp)
        prefix = torch.cat([q[:, :n, mine], k[:, :n, mine], v[:, :n, mine]])
        qkv = torch.cat([prefix, qkv], dim=1)
    out = attention(*qkv.split(b), scale=scale)  # (batch, n + seq_len, heads / degree, head_dim)
    body = out[:, n:]
    if layout.padded_len > layout.seq_len:
        body = torch.cat([body, body.new_zeros(b, layout.padded_len - layout.seq_len, hp, body.shape[-1])], 1)
    body = heads_to_seq(body, group, degree)
    if not n:
        return body
    return torch.cat([gather_heads(out[:, :n], group, degree), body], dim=1)


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
