"""Step caching: skip most of the DiT on denoising steps where it would change little (first-block cache).

    from diffserve.runtime.step_cache import StepCacheConfig
    pipeline.step_cache = StepCacheConfig()   # the pipeline's default (threshold 0.15); None: off
    GenerationRequest(..., extra={"step_cache_threshold": 0.0})   # per request; 0 turns it off

One mechanism, the policy as data (StepCacheConfig). The DiT is split into a head (its first `head_blocks`
blocks) and a tail (the rest), each its own CUDA graph (DiTParts). At every step the head runs; its
"signal" — what the head added to the residual stream — is compared with the signal of the last step that
ran the whole DiT:

    relative L1 change = sum|signal_now - signal_then| / sum|signal_then|

Under `threshold`, the tail is skipped and the residual it added on that earlier step (tail output - tail
input, kept per branch) is added to the head's output instead; otherwise the tail runs and its residual and
the head's signal are kept. Never skipped: the first `warmup_steps` steps, the last `last_steps_computed`
ones, and a step after `max_consecutive_skips` skips in a row. (ParaAttention's and cache-dit's First-Block
Cache; here the comparison is with the last computed step, so the drift accumulates over skipped steps.)

Branches. A step's DiT calls (FLUX's true-CFG pair, Wan's CFG pair; a Wan2.2 expert has DiTParts of its
own) keep separate caches — signal and residual per (DiTParts, branch key) — but the step's decision is ONE
for all of them: the L1 sums of every branch are added before the comparison. So under CFG parallelism
(one branch per rank) and Ulysses (one shard of the tokens per rank) the sums are all-reduced over the
parallel world and every rank takes the same decision, the one a single process would take (up to the
rounding of the sums); and a CFG step is either reused or computed as a whole (under CFG parallelism the
slower rank would set the pace anyway).

Host reads. The decision needs the two sums on the host: one read of two floats per step (none on steps
whose decision is known without it: warm-up, last steps, the cap, forced patterns). That read waits for
the head, is the one deliberate exception to the denoising loop's no-sync rule, and is made under
cuda_graphs.sync_allowed() so that DIFFSERVE_CHECK_SYNC=1 still checks everything else in the loop. The GPU
idles for one graph launch after it (the tail or the reuse part is queued right away).

Off (threshold 0 and no forced pattern, or no config): every DiT call is the pipeline's plain GraphedForward
call of the whole model, exactly as without this module (same graph, bit-identical output); only the
forwards are counted.

Memory: with caching on, the head, tail and reuse parts hold CUDA graph pools of their own (the tail's
about the size of the whole forward's) instead of the whole forward's graph, and each branch keeps its
signal and residual (image-sized tensors) for the rest of the generation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

POLICIES = ("first-block",)
# Picked with benchmarks/step_cache_quality.py on the bundled model (20 steps, 32 held-out prompts): with
# warmup_steps 6, 0.15 reused 41% of the forwards at a pooled PSNR of 37.6 dB against uncached, the judge
# within 1.2 points. Reuses in the first steps change the picture's composition (a different object, 12 dB)
# where the same threshold later changes only details: hence the long warm-up.
DEFAULT_THRESHOLD = 0.15
MAX_THRESHOLD = 1.0
REQUEST_KEY = "step_cache_threshold"  # GenerationRequest.extra[...]: this request's threshold


@dataclasses.dataclass(frozen=True)
class StepCacheConfig:
    """How a pipeline caches steps. Validated here, once; every bad value raises ValueError (one line).

    threshold: relative L1 change of the head's signal under which a step reuses (0: never; off).
    warmup_steps: the first steps, always computed. last_steps_computed: the last steps, always computed.
    max_consecutive_skips: at most this many reused steps in a row. head_blocks: the blocks of the head.
    force: for tests and benchmarks only — force[i] True reuses step i, False computes it (steps past the
    end of the list compute), whatever the threshold, warm-up, last steps or cap say; a step whose branch
    has nothing cached yet (the first step; a Wan2.2 expert's first step) computes all the same."""

    policy: str = "first-block"
    threshold: float = DEFAULT_THRESHOLD
    warmup_steps: int = 6
    last_steps_computed: int = 1
    max_consecutive_skips: int = 2
    head_blocks: int = 1
    force: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"step cache policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= MAX_THRESHOLD:
            raise ValueError(
                f"step cache threshold must be a number between 0 and {MAX_THRESHOLD:g}, got {t!r}"
            )
        object.__setattr__(self, "threshold", float(t))
        for name, low in (
            ("warmup_steps", 0),
            ("last_steps_computed", 0),
            ("max_consecutive_skips", 1),
            ("head_blocks", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"step cache {name} must be an integer >= {low}, got {value!r}")
        if self.force is not None:
            force = self.force
            if isinstance(force, (str, bytes)) or not isinstance(force, Sequence):
                raise ValueError(f"step cache force must be a list of booleans, got {force!r}")
            if not all(isinstance(f, bool) for f in force):
                raise ValueError(f"step cache force must hold only True/False, got {list(force)!r}")
            if force and force[0]:
                raise ValueError("step cache force[0] must be False: the first step has nothing to reuse")
            object.__setattr__(self, "force", tuple(force))

    @property
    def enabled(self) -> bool:
        return self.force is not None or self.threshold > 0.0

    @classmethod
    def forced_fraction(cls, steps: int, fraction: float, **kwargs) -> StepCacheConfig:
        """A forced pattern reusing round(fraction * steps) steps, spread evenly over steps 1..steps-1
        (for benchmarks: "forced reuse fractions 0/25/50%")."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"forced reuse fraction must be in [0, 1), got {fraction!r}")
        reused = min(round(fraction * steps), steps - 1)
        force = [False] * steps
        for k in range(reused):  # evenly spaced among steps 1..steps-1
            force[1 + (k * (steps - 1)) // reused] = True
        return cls(force=tuple(force), **kwargs)


def check_request(plan) -> None:
    """Validate GenerationRequest.extra["step_cache_threshold"] when the request gives one: InvalidRequest
    unless a number in [0, MAX_THRESHOLD] (stored back in plan.extra as a float). For the pipelines' plan()."""
    from diffserve.runtime.pipelines.stages import extra_number

    if REQUEST_KEY in plan.extra:
        extra_number(plan, REQUEST_KEY, 0.0, 0.0, MAX_THRESHOLD)


def config_for(plan, default: StepCacheConfig | None) -> StepCacheConfig | None:
    """The config one generation runs with: the pipeline's default (None: off), or, when the request gives a
    threshold, that threshold (0: off) with the rest of the default's policy (StepCacheConfig's defaults
    when the pipeline has none)."""
    if REQUEST_KEY not in plan.extra:
        return default
    threshold = plan.extra[REQUEST_KEY]
    if threshold == 0.0:
        return None
    return dataclasses.replace(default or StepCacheConfig(), threshold=threshold)


def unpadded_rows(seq, x: torch.Tensor, dim: int) -> torch.Tensor:
    """x without the padding rows a sequence-parallel shard may end with (ulysses.SequenceShards): what a
    step-cache signal sums over. Unsharded (seq without a layout): x."""
    layout = getattr(seq, "layout", None)
    if layout is None or layout.padded_len == layout.seq_len:
        return x
    real = min(layout.local_len, max(0, layout.seq_len - seq.state.ulysses_rank * layout.local_len))
    return x.narrow(dim, 0, real)


class DiTParts:
    """A DiT's forward_head / forward_tail / forward_reuse, each a GraphedForward of its own (graphed per
    input layout on a GPU, plain calls elsewhere): what the step cache runs when it is on. See the model
    files for what the parts compute; they take forward's keyword arguments plus `head_blocks` and the
    named state tensors. (When it is off, the pipeline's GraphedForward of the whole model runs instead.)"""

    def __init__(self, model: torch.nn.Module):
        from diffserve.runtime.cuda_graphs import GraphedForward

        self.head = GraphedForward(model.forward_head)
        self.tail = GraphedForward(model.forward_tail)
        self.reuse = GraphedForward(model.forward_reuse)
        self.state_names: tuple[str, ...] = model.step_state_names
        self.residual_names: tuple[str, ...] = model.step_residual_names

    @property
    def graphs(self) -> list:
        """The parts' GraphedForwards (for NativePipeline._drop_cuda_graphs: keep them in a list attribute)."""
        return [self.head, self.tail, self.reuse]


@dataclasses.dataclass
class _Branch:
    signal: torch.Tensor | None = None  # the head's signal at the last computed step
    residual: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # the tail's, named


class StepCache:
    """One generation's step cache: what each branch keeps, the decisions, the counts.

    `step(i, full, parts, calls)` runs step i's DiT calls ({branch key: forward kwargs}) and returns their
    outputs ({branch key: output}, each what full(**kwargs)[0] gives): through `full` (the pipeline's
    GraphedForward of the whole DiT) when off, through `parts` (its DiTParts) when on. `counts()` -> {"computed": n,
    "cached": m}, one per branch forward. For tests and benchmarks: `reused_steps` (steps reused) and
    `ratios` (step -> the relative L1 change measured there)."""

    def __init__(self, config: StepCacheConfig | None, steps: int, group: Any = None, reduce: bool = False):
        """group/reduce: with reduce=True the L1 sums are all-reduced over `group` (a torch.distributed
        process group; None: the default world) before the decision; see for_run."""
        self.config = config if config is not None and config.enabled else None
        self.steps, self.group, self.reduce = steps, group, reduce
        self.computed = self.cached = 0
        self.reused_steps: list[int] = []
        self.ratios: dict[int, float] = {}
        self._branches: dict[tuple[int, Hashable], _Branch] = {}
        self._consecutive = 0

    @classmethod
    def for_run(cls, config: StepCacheConfig | None, steps: int) -> StepCache:
        """A cache for one generation of `steps` steps in this process: its decisions are all-reduced over
        the parallel world when there is one (every rank runs the same steps of the same request)."""
        from diffserve.runtime.distributed import group as pg

        state = pg.current()
        return cls(config, steps, reduce=state is not None and state.world_size > 1)

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def counts(self) -> dict[str, int]:
        return {"computed": self.computed, "cached": self.cached}

    def step(
        self,
        i: int,
        full: Callable,
        parts: DiTParts,
        calls: dict[Hashable, dict[str, Any]],
        forwards: int | None = None,
    ) -> dict[Hashable, torch.Tensor]:
        """forwards: how many branch forwards the step stands for in the counts (default len(calls); a CFG
        step on one rank of a CFG-parallel pair stands for 2)."""
        n = len(calls) if forwards is None else forwards
        if self.config is None:  # off: exactly the plain call
            self.computed += n
            return {key: full(**kwargs)[0] for key, kwargs in calls.items()}
        head_blocks = self.config.head_blocks
        branches = {key: self._branches.setdefault((id(parts), key), _Branch()) for key in calls}
        heads = {key: parts.head(head_blocks=head_blocks, **kwargs) for key, kwargs in calls.items()}
        reuse = self._decide(i, branches, heads)
        out = {}
        for key, kwargs in calls.items():
            signal, *state = heads[key]
            state = dict(zip(parts.state_names, state, strict=False))
            branch = branches[key]
            if reuse:
                out[key] = parts.reuse(head_blocks=head_blocks, **kwargs, **state, **branch.residual)
            else:
                out[key], *residual = parts.tail(head_blocks=head_blocks, **kwargs, **state)
                branch.signal = signal
                branch.residual = dict(zip(parts.residual_names, residual, strict=False))
        if reuse:
            self.cached += n
            self._consecutive += 1
            self.reused_steps.append(i)
        else:
            self.computed += n
            self._consecutive = 0
        return out

    def _decide(self, i: int, branches: dict[Hashable, _Branch], heads: dict) -> bool:
        """Whether step i reuses. The same answer on every rank (see the module docstring)."""
        c = self.config
        if any(b.signal is None for b in branches.values()):
            return False  # a branch with nothing cached: compute (and, when parallel, so does every rank)
        if c.force is not None:
            return i < len(c.force) and c.force[i]
        if i < c.warmup_steps or i >= self.steps - c.last_steps_computed:
            return False
        if self._consecutive >= c.max_consecutive_skips:
            return False
        sums = torch.stack([_l1_sums(heads[key][0], b.signal) for key, b in branches.items()]).sum(0)
        if self.reduce:
            import torch.distributed as dist

            dist.all_reduce(sums, group=self.group)
        from diffserve.runtime.cuda_graphs import sync_allowed

        with sync_allowed():  # THE one host read of a step (see the module docstring)
            change, reference = sums.tolist()
        ratio = change / reference if reference > 0 else math.inf
        self.ratios[i] = ratio
        return ratio < c.threshold


def _l1_sums(now: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """[sum |now - then|, sum |then|] in float32, on the device."""
    return torch.stack(
        [
            torch.linalg.vector_norm(now - then, ord=1, dtype=torch.float32),
            torch.linalg.vector_norm(then, ord=1, dtype=torch.float32),
        ]
    )


def guided_pair(
    cache: StepCache, i: int, full: Callable, parts: DiTParts, cond: dict[str, Any], uncond: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) predictions of a CFG step through the cache, as distributed.cfg_pair
    gives them: alone, both branches in this process (one decision for the pair); with CFG parallelism,
    this rank's branch, the other received from its partner (the decision all-reduced: the same on both)."""
    from diffserve.runtime.distributed import group as pg
    from diffserve.runtime.distributed.cfg import cfg_pair

    state = pg.current()
    if state is None or state.cfg_group is None:
        out = cache.step(i, full, parts, {"cond": cond, "uncond": uncond})
        return out["cond"], out["uncond"]
    return cfg_pair(
        lambda: cache.step(i, full, parts, {"cond": cond}, forwards=2)["cond"],
        lambda: cache.step(i, full, parts, {"uncond": uncond}, forwards=2)["uncond"],
    )
