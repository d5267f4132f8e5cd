"""How to load and run one model: the settings `diffserve generate`, `diffserve serve` (through its worker) and
the Python API all hand to the runtime, as one dataclass validated here and nowhere else.

    CLI flag -> RuntimeConfig (validated in __post_init__) -> the worker's config -> the runner factory

No torch here: the server process builds it (and ships it to its worker by pickling).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffserve.platforms.backends import AttentionBackendEnum

# Every spelling the command line accepts for a dtype -> torch's name for it.
DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}
QUANTIZATIONS = ("fp8", "fp8-attention")
DTYPE_HELP = "bf16|bfloat16, fp16|float16 or fp32|float32 (default: bf16 on GPUs, fp32 on the CPU)"


def canonical_dtype(name: str | None) -> str | None:
    """'bf16', 'BFloat16', 'torch.bfloat16' -> 'bfloat16'; None -> None (the device's default)."""
    if name is None:
        return None
    canonical = DTYPES.get(str(name).strip().lower().removeprefix("torch."))
    if canonical is None:
        raise ValueError(f"unknown dtype {name!r}: use {DTYPE_HELP.split(' (')[0]}")
    return canonical


@dataclass(frozen=True)
class RuntimeConfig:
    model: str | None = None  # a diffusers directory or a cached Hugging Face id; None -> the bundled model
    device: str | None = None  # None -> the first accelerator, else the CPU
    dtype: str | None = None  # canonical torch name after validation; None -> bf16 on GPUs, fp32 on the CPU
    attention_backend: str | None = None  # canonical backend name; None -> the platform's priority list
    compile: bool = False  # torch.compile the DiT blocks (runtime/compile.py)
    ulysses_degree: int = 1  # every DiT forward split over this many GPUs
    cfg_parallel: bool = False  # the two guidance branches on two GPU groups
    # "fp8": DiT linears in FP8 e4m3 (runtime/layers/fp8.py); "fp8-attention": those and the DiT's
    # self-attention too (kernels/fp8_attention.py); None: as loaded
    quantization: str | None = None
    step_cache: str | None = None  # "first-block": reuse the DiT's tail on steps that change little
    step_cache_threshold: float | None = None  # None: the policy's default (runtime/step_cache.py)
    # LoRA adapters (runtime/lora.py): ((name, path), ...); "NAME=PATH" strings are accepted and split here
    loras: tuple = ()
    max_loras: int = 4  # adapters resident on the device at once (LRU); the rest wait in host memory
    # "model": text encoders + VAE in host memory except while they run; "layerwise": also the DiT's blocks,
    # streamed (runtime/offload.py); None: everything resident on the device
    offload: str | None = None

    def __post_init__(self) -> None:
        # frozen: normalise through object.__setattr__, once, here
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        backend = AttentionBackendEnum.parse(self.attention_backend)
        object.__setattr__(self, "attention_backend", backend.value if backend else None)
        if self.model is not None and not str(self.model).strip():
            raise ValueError("--model must not be empty")
        from diffserve.runtime.distributed.config import ParallelConfig

        ParallelConfig(self.ulysses_degree, self.cfg_parallel)  # raises ParallelConfigError (a ValueError)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if self.step_cache is not None or self.step_cache_threshold is not None:
            self.step_cache_config()  # raises ValueError (one line) on a bad policy or threshold
        object.__setattr__(self, "loras", parse_loras(self.loras))
        if self.offload is not None:
            check_offload(self)
        if isinstance(self.max_loras, bool) or not isinstance(self.max_loras, int) or self.max_loras < 1:
            raise ValueError(f"--max-loras must be an integer of at least 1, got {self.max_loras!r}")

    @property
    def lora_names(self) -> list[str]:
        return [name for name, _ in self.loras]

    def step_cache_config(self):
        """The pipelines' default StepCacheConfig (None: off). A threshold alone implies the default policy."""
        from diffserve.runtime.step_cache import POLICIES, StepCacheConfig

        if self.step_cache is None and self.step_cache_threshold is None:
            return None
        policy = self.step_cache or POLICIES[0]
        if policy not in POLICIES:
            raise ValueError(f"--step-cache must be one of {', '.join(POLICIES)}, got {policy!r}")
        kwargs = {} if self.step_cache_threshold is None else {"threshold": self.step_cache_threshold}
        try:
            return StepCacheConfig(policy=policy, **kwargs)
        except ValueError as e:
            raise ValueError(f"--step-cache-threshold: {e}") from None

    @property
    def parallel(self):
        from diffserve.runtime.distributed.config import ParallelConfig

        return ParallelConfig(self.ulysses_degree, self.cfg_parallel)


OFFLOADS = ("model", "layerwise")


def check_offload(config: RuntimeConfig) -> None:
    """--offload and the flags it cannot run with (one line each)."""
    if config.offload not in OFFLOADS:
        raise ValueError(f"--offload must be one of {', '.join(OFFLOADS)}, got {config.offload!r}")
    if config.offload == "layerwise":
        # compile traces blocks whose weights move between calls; LoRA slots sit beside the block weights
        if config.compile:
            raise ValueError(
                "--offload layerwise cannot run with --compile (the streamed blocks run eagerly)"
            )
        if config.loras:
            raise ValueError("--offload layerwise cannot run with --lora (use --offload model)")


LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_loras(specs) -> tuple[tuple[str, str], ...]:
    """--lora values ("NAME=PATH" or (name, path) pairs) -> ((name, path), ...), names unique and of the form
    LORA_NAME (they travel in request JSON and in /v1/models). The files are read at load (runtime/lora.py)."""
    out: list[tuple[str, str]] = []
    for spec in specs or ():
        if isinstance(spec, str):
            name, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"--lora must be NAME=PATH, got {spec!r}")
        else:
            name, path = spec
        name, path = str(name).strip(), str(path).strip()
        if not LORA_NAME.match(name):
            raise ValueError(
                f"--lora name {name!r}: use letters, digits, '.', '_' or '-' (at most 64, starting alphanumeric)"
            )
        if not path:
            raise ValueError(f"--lora {name}: the path is empty")
        if name in {n for n, _ in out}:
            raise ValueError(f"--lora {name} is given twice")
        out.append((name, path))
    return tuple(out)


def add_runtime_arguments(parser) -> None:
    """The flags that build a RuntimeConfig, the same on `diffserve generate` and `diffserve serve`."""
    from diffserve.runtime.distributed.config import add_parallel_arguments

    a = parser.add_argument
    a(
        "--model",
        help="diffusers model directory or Hugging Face id in the local cache "
        "(default: the bundled small FLUX-architecture model)",
    )
    a(
        "--attention-backend",
        metavar="B",
        help="auto, fa3, fa2 or torch_sdpa (default: $DIFFSERVE_ATTENTION_BACKEND, else auto: the platform's best)",
    )
    a(
        "--compile",
        action="store_true",
        help="torch.compile the DiT blocks during warm-up (kernels cached in $DIFFSERVE_CACHE_DIR/inductor, "
        "default ~/.cache/diffserve/inductor, so a restart is warm in seconds)",
    )
    a("--device", metavar="D", help="cpu, cuda, cuda:N or xpu (default: the first GPU, else cpu)")
    a("--dtype", metavar="T", help=DTYPE_HELP)
    a(
        "--quantization",
        choices=QUANTIZATIONS,
        help="fp8: DiT linear layers with FP8 e4m3 weights (per output channel) and per-token activation "
        "scales; halves the DiT's weight memory, changes the output slightly. fp8-attention: also the "
        "FLUX/Wan DiT self-attention in FP8 (FlashAttention-3 e4m3 on Hopper; emulated on the CPU), "
        "faster on long videos, changes the output more (default: off)",
    )
    a(
        "--step-cache",
        choices=("first-block", "off"),
        help="first-block: skip the DiT's tail on steps whose first block changes little (default: off; a "
        "request's step_cache_threshold overrides the threshold, 0 turns it off for that request)",
    )
    a(
        "--step-cache-threshold",
        type=float,
        metavar="T",
        help="relative L1 change of the first block's output under which a step is reused, 0..1; implies "
        "--step-cache first-block (default 0.15)",
    )
    a(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a LoRA adapter (safetensors, diffusers/PEFT or kohya format) that requests may apply by NAME "
        "(native FLUX and Wan DiTs; repeatable)",
    )
    a(
        "--max-loras",
        type=int,
        default=4,
        metavar="N",
        help="LoRA adapters resident on the GPU at once, least recently used out (default 4)",
    )
    a(
        "--offload",
        choices=OFFLOADS,
        help="model: text encoders and VAE in host memory, on the GPU only while they run; layerwise: also "
        "the DiT's blocks, streamed from pinned host memory one ahead (no CUDA graphs for the DiT) "
        "(default: everything resident)",
    )
    add_parallel_arguments(parser)  # --ulysses-degree, --cfg-parallel (multi-GPU; also under torchrun)


def runtime_config_from_args(args) -> RuntimeConfig:
    """The flags of add_runtime_arguments (and the variables that stand in for them) -> RuntimeConfig.
    Raises ValueError with a one-line message."""
    from diffserve import envs

    return RuntimeConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend or envs.DIFFSERVE_ATTENTION_BACKEND,
        compile=args.compile,
        ulysses_degree=args.ulysses_degree,
        cfg_parallel=args.cfg_parallel,
        quantization=args.quantization,
        step_cache=None if args.step_cache == "off" else args.step_cache,
        step_cache_threshold=args.step_cache_threshold,
        loras=tuple(args.lora or ()),
        max_loras=args.max_loras,
        offload=args.offload,
    )
