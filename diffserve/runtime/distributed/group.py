"""The process group and the parallel state the DiTs and pipelines consult.

Backends: "nccl" on CUDA — the same name in a ROCm build of torch, where it is RCCL —, "xccl" on Intel
XPU, "gloo" on the CPU. Ranks are laid out as rank = cfg_rank * ulysses_degree + ulysses_rank, so a Ulysses
group (the all-to-all on every attention layer, the heaviest traffic) is consecutive ranks — one node, on
NVLink, when the degree fits a node — while CFG's one all-gather per step may cross nodes.

Besides the device groups there is one gloo "control" group over all ranks, for Python objects (the next
request, the cancel flag): it never touches the GPU streams, and its timeout is long because followers
wait on it while the server is idle.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffserve.runtime.distributed.config import ParallelConfig, ParallelConfigError

logger = logging.getLogger(__name__)

# Followers block on the control group between requests, for as long as the server stays idle.
CONTROL_TIMEOUT = datetime.timedelta(days=365)
# A collective that never completes (a rank died mid-step) fails after this instead of hanging forever.
DEVICE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class SequenceLayout:
    """How the current DiT forward's tokens are split (set by ulysses.shard_sequence, read by attention).

    seq_len real sharded tokens, padded to padded_len = degree * local_len; `prefix` tokens (FLUX's text)
    lead every attention input whole on every rank and are not sharded."""

    seq_len: int
    padded_len: int
    local_len: int
    prefix: int = 0


@dataclass
class ParallelState:
    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    ulysses_rank: int
    ulysses_group: object | None  # ProcessGroup; None when the degree is 1
    cfg_rank: int  # 0 computes the conditional branch, 1 the unconditional one
    cfg_group: object | None  # ProcessGroup; None without CFG parallelism
    control_group: object | None  # gloo ProcessGroup over all ranks; None when the world is one process
    layout: SequenceLayout | None = None

    @property
    def ulysses_size(self) -> int:
        return self.config.ulysses_degree

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


_active: ParallelState | None = None


def current() -> ParallelState | None:
    """The parallel state of this process, or None when it runs alone (the common case: a plain read)."""
    return _active


def activate(state: ParallelState | None) -> ParallelState | None:
    """Make `state` the one the DiTs and pipelines use (None: run unsharded); returns the previous one."""
    global _active
    previous, _active = _active, state
    return previous


def backend_for(device: torch.device) -> str:
    if device.type == "cuda":
        return "nccl"  # RCCL under ROCm: torch keeps the name
    if device.type == "xpu":
        return "xccl"
    if device.type == "cpu":
        return "gloo"
    raise ParallelConfigError(f"no torch.distributed backend for device type {device.type!r}")


def env_rank() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment variables, or None outside torchrun."""
    from diffserve import envs

    rank, world = envs.RANK, envs.WORLD_SIZE
    if rank is None or world is None:
        return None
    local = envs.LOCAL_RANK
    return rank, world, rank if local is None else local


def init_distributed(
    config: ParallelConfig,
    device: torch.device | str,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
) -> ParallelState:
    """Join the process group (if this process has not already) and activate the parallel state.

    rank/world_size default to torchrun's RANK/WORLD_SIZE, init_method to env:// (MASTER_ADDR/PORT).
    `device` is this rank's own device (e.g. cuda:3): it picks the backend and becomes the current one."""
    device = torch.device(device)
    if rank is None or world_size is None:
        from_env = env_rank()
        if from_env is None:
            raise ParallelConfigError("no rank given and no torchrun environment (RANK, WORLD_SIZE) set")
        rank, world_size = from_env[0], from_env[1]
    config.check_world_size(world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "xpu":
        torch.xpu.set_device(device)
    if not dist.is_initialized():
        backend = backend_for(device)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=DEVICE_TIMEOUT,
            **kwargs,
        )
        logger.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, device)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ParallelConfigError(
            f"this process is already rank {dist.get_rank()} of {dist.get_world_size()}, not {rank} of {world_size}"
        )
    state = build_state(config, device)
    activate(state)
    return state


def build_state(config: ParallelConfig, device: torch.device | str) -> ParallelState:
    """The Ulysses, CFG and control groups for `config` over the initialised world. Every rank must call
    this, in the same order (new_group is collective), even for groups it is not part of."""
    world, rank = dist.get_world_size(), dist.get_rank()
    config.check_world_size(world)
    u, c = config.ulysses_degree, config.cfg_degree
    ulysses_group = cfg_group = None
    if u > 1:
        for i in range(c):
            group = dist.new_group(list(range(i * u, (i + 1) * u)))
            if rank // u == i:
                ulysses_group = group
    if c > 1:
        for j in range(u):
            group = dist.new_group([i * u + j for i in range(c)])
            if rank % u == j:
                cfg_group = group
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if world > 1 else None
    return ParallelState(
        config=config,
        rank=rank,
        world_size=world,
        device=torch.device(device),
        ulysses_rank=rank % u,
        ulysses_group=ulysses_group,
        cfg_rank=rank // u,
        cfg_group=cfg_group,
        control_group=control,
    )


def all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """Rank i's `inp` into out[i] (out: (group size, *inp.shape)) or into rows i*len(inp).. of out (out:
    (group size * len(inp), ...)), over `group`."""
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (and deprecated the old name).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    # gloo takes only the concatenated form; a contiguous stacked `out` is viewed as that.
    gather(out.flatten(0, 1) if out.dim() == inp.dim() + 1 else out, inp, group=group)


def shutdown_distributed() -> None:
    """Deactivate the parallel state and leave the process group (safe to call twice)."""
    activate(None)
    if dist.is_initialized():
        dist.destroy_process_group()
