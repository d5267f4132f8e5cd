"""How a generation is split over GPUs: one dataclass, validated here and nowhere else.

    world size = ulysses_degree * (2 if cfg_parallel else 1)

Ulysses (sequence parallelism) splits the image/video tokens of every DiT forward over `ulysses_degree`
ranks and regroups them by attention head around each attention call, so the head count must divide
evenly; the token count need not (the last shard is padded, and the padding is dropped before attention).
CFG parallelism runs the conditional and the unconditional branch of classifier-free guidance on two
halves of the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

# wan-i2v runs the same native Wan DiT: only the video tokens are sharded; its cross-attention context (CLIP
# image rows + text rows) is whole on every rank (tests/unit/test_wan_i2v_parallel.py).
PARALLEL_FAMILIES = ("flux", "wan", "wan-i2v")


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work for this world or this model; the message says what to change."""


@dataclass(frozen=True)
class ParallelConfig:
    ulysses_degree: int = 1
    cfg_parallel: bool = False

    def __post_init__(self):
        if isinstance(self.ulysses_degree, bool) or not isinstance(self.ulysses_degree, int):
            raise ParallelConfigError(f"--ulysses-degree must be an integer, got {self.ulysses_degree!r}")
        if self.ulysses_degree < 1:
            raise ParallelConfigError(f"--ulysses-degree must be at least 1, got {self.ulysses_degree}")
        if not isinstance(self.cfg_parallel, bool):
            raise ParallelConfigError(f"cfg_parallel must be True or False, got {self.cfg_parallel!r}")

    @property
    def cfg_degree(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.cfg_degree

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"ulysses {self.ulysses_degree} x cfg {self.cfg_degree} = {self.world_size} ranks"

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ParallelConfigError(
                f"{self.describe()} needs exactly {self.world_size} processes, but the process group has "
                f"{world_size}: start {self.world_size} (e.g. torchrun --nproc-per-node {self.world_size}) "
                "or change --ulysses-degree/--cfg-parallel"
            )

    def check_model(self, family: str, num_heads: int, label: str = "this model") -> None:
        """Only our native DiTs (FLUX, Wan) have the sharding hooks; Ulysses gives each rank
        num_heads / ulysses_degree whole heads."""
        if self.enabled and family not in PARALLEL_FAMILIES:
            raise ParallelConfigError(
                f"--ulysses-degree/--cfg-parallel work with FLUX and Wan models; {label} is served by the "
                f"{family} pipeline"
            )
        if num_heads % self.ulysses_degree:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ParallelConfigError(
                f"{label} has {num_heads} attention heads, which --ulysses-degree {self.ulysses_degree} does "
                f"not divide; use one of {', '.join(map(str, divisors))}"
            )

    def check_devices(self, device_type: str, available: int) -> None:
        if device_type != "cpu" and available < self.world_size:
            raise ParallelConfigError(
                f"{self.describe()} needs {self.world_size} {device_type} devices on this node, "
                f"{available} visible"
            )


def add_parallel_arguments(parser) -> None:
    """--ulysses-degree and --cfg-parallel, for `diffserve generate` and `diffserve serve` alike."""
    parser.add_argument(
        "--ulysses-degree",
        type=int,
        default=1,
        metavar="N",
        help="split every DiT forward's image/video tokens over N GPUs (Ulysses sequence parallelism; "
        "N must divide the model's attention heads). Default 1",
    )
    parser.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="run the conditional and unconditional branches of classifier-free guidance on two groups of "
        "GPUs at once (GPUs used: 2 x the Ulysses degree); speeds up guided requests only (Wan with "
        "guidance > 1, FLUX with true CFG)",
    )
