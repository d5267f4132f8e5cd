"""CFG parallelism: classifier-free guidance needs two DiT forwards per step, conditional and unconditional;
with --cfg-parallel, ranks of CFG rank 0 compute the first and ranks of CFG rank 1 the second, at the same
time, and one all-gather gives both predictions to every rank. Each rank then combines them and steps its
scheduler on identical tensors, so the latents stay bit-identical across ranks without any other exchange.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffserve.runtime.distributed import group as pg


def cfg_pair(
    cond: Callable[[], torch.Tensor], uncond: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) predictions. Alone: calls both. With CFG parallelism: calls the one of
    this rank's branch and receives the other from its partner rank."""
    state = pg.current()
    if state is None or state.cfg_group is None:
        return cond(), uncond()
    mine = (cond if state.cfg_rank == 0 else uncond)().contiguous()
    both = mine.new_empty((2, *mine.shape))
    pg.all_gather_into(both, mine, state.cfg_group)
    return both[0], both[1]
