"""Wan2.1-1.3B, 480x832 x 81 frames: time per denoising step on 1 GPU and spread over N GPUs with Ulysses
sequence parallelism and/or CFG parallelism (diffserve.runtime.distributed).

A step is what WanPipeline does per denoising step at guidance 5: two DiT forwards (conditional and
unconditional text) through distributed.cfg.cfg_pair, then the guidance combination. Latents
(1, 16, 21, 60, 104) -> 32,760 video tokens, text 512 x 4096, bf16, random weights at full size
(dit_specs.FULL["wan"]: 12 heads, so Ulysses degrees 1, 2, 3, 4, 6, 12).

Run under torchrun; rank 0 first times the 1-GPU baseline alone (the other ranks wait), then every layout
of the world size is timed on all ranks:
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py     # ulysses 2, cfg 2
    torchrun --nproc-per-node 4 benchmarks/bench_parallel.py     # ulysses 4, ulysses 2 x cfg 2
    python benchmarks/bench_parallel.py                          # the baseline alone
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --tiny    # CPU, gloo, tiny DiT: checks the script
  --compile: fused projections + each block torch.compiled (diffserve.runtime.compile), as served fast.

Figures: ms per step = median over --iters steps after --warmup, each step started together (a barrier)
and timed to the slowest rank's end (all-reduce max); speed-up = baseline ms / layout ms (targets: >= 1.8x
on 2 GPUs, >= 3.3x on 4); rel. err of the layout's guided prediction against the baseline's (bf16).
Recorded in benchmarks/results.jsonl (benchmarks/record.py) by rank 0; --tiny records nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dit_specs import FULL, TINY, make_inputs  # noqa: E402  (one place for the configs)
from harness import init_weights_, on_device, rel_err, synchronize  # noqa: E402
from record import record  # noqa: E402

from diffserve.runtime.distributed import group as pg  # noqa: E402
from diffserve.runtime.distributed.cfg import cfg_pair  # noqa: E402
from diffserve.runtime.distributed.config import ParallelConfig, ParallelConfigError  # noqa: E402

GUIDANCE = 5.0
# A tiny Wan with 4 heads, so that Ulysses 2 and 4 both fit.
TINY_WAN = {
    **TINY["wan"],
    "config": {**TINY["wan"]["config"], "num_attention_heads": 4, "attention_head_dim": 8},
}


def layouts_for(world: int, heads: int) -> list[ParallelConfig]:
    """Every layout of exactly `world` ranks that the head count allows: ulysses W, ulysses W/2 x cfg 2."""
    out = []
    for config in (ParallelConfig(world), ParallelConfig(world // 2, True) if world % 2 == 0 else None):
        if config is None or config.world_size != world:
            continue
        try:
            config.check_model("wan", heads)
        except ParallelConfigError as e:
            print(f"skipping {config.describe()}: {e}", flush=True)
            continue
        out.append(config)
    return out


def build_model(config: dict, device: torch.device, dtype: torch.dtype):
    from diffserve.runtime.models.wan import WanTransformer

    model = on_device(device, dtype, lambda: WanTransformer.from_config(dict(config)))
    init_weights_(model, seed=0)  # the same seed on every rank: the same weights
    return model


def make_step(model, inputs: dict, uncond_text: torch.Tensor):
    def forward(text):
        return model(
            hidden_states=inputs["hidden_states"],
            timestep=inputs["timestep"],
            encoder_hidden_states=text,
            return_dict=False,
        )[0]

    def step():
        cond, uncond = cfg_pair(
            lambda: forward(inputs["encoder_hidden_states"]), lambda: forward(uncond_text)
        )
        return uncond + GUIDANCE * (cond - uncond)

    return step


def time_step(step, device, warmup: int, iters: int, together: bool) -> tuple[float, torch.Tensor]:
    """(median ms of the slowest rank, last output). together: all ranks start each step at a barrier."""
    for _ in range(warmup):
        out = step()
    times = []
    for _ in range(iters):
        synchronize(device)
        if together:
            dist.barrier()
        start = time.perf_counter()
        out = step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    times = torch.tensor(times, dtype=torch.float64, device=device)
    if together:
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return statistics.median(times.tolist()), out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="CPU (gloo), tiny DiT; records nothing")
    parser.add_argument("--attention-backend", help="fa3, fa2, torch_sdpa (default: the platform's choice)")
    parser.add_argument("--fuse", action="store_true", help="fused q/k/v projections (runtime.compile)")
    parser.add_argument("--compile", action="store_true", help="--fuse + torch.compile of each block")
    args = parser.parse_args()
    if args.attention_backend:
        from diffserve.runtime.layers.attention import set_attention_backend

        set_attention_backend(args.attention_backend)

    rank, world, local_rank = pg.env_rank() or (0, 1, 0)
    spec = TINY_WAN if args.tiny else FULL["wan"]
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA/ROCm GPUs (or --tiny for the CPU check)")
        device, dtype = torch.device("cuda", local_rank), torch.bfloat16
    layouts = layouts_for(world, spec["config"]["num_attention_heads"]) if world > 1 else []
    if world > 1 and not layouts:
        raise SystemExit(f"no Ulysses/CFG layout of {world} ranks fits {spec['label']}")
    states = []
    if world > 1:
        states = [pg.init_distributed(layouts[0], device, rank=rank, world_size=world)]
        states += [pg.build_state(config, device) for config in layouts[1:]]
    model = build_model(spec["config"], device, dtype)
    variant = "compile" if args.compile else "fuse" if args.fuse else "eager"
    if variant != "eager":
        from diffserve.runtime.compile import optimize_dit

        optimize_dit(model, compile=args.compile)  # compiles during each layout's warm-up
    inputs, n_vid, n_txt, flops = make_inputs("wan", spec["config"], spec["shape"], 1, device, dtype)
    uncond = torch.randn(inputs["encoder_hidden_states"].shape, generator=torch.Generator().manual_seed(2))
    step = make_step(model, inputs, uncond.to(device, dtype))
    flops *= 2  # two forwards per step
    label = f"parallel_step_{spec['label'].replace(' ', '_')}"
    rows = []

    with torch.inference_mode():
        pg.activate(None)
        base_ms, base_out = None, None
        if rank == 0:  # the baseline: one GPU does both forwards
            base_ms, base_out = time_step(step, device, args.warmup, args.iters, together=False)
            rows.append(("1 GPU", 1, base_ms, None))
            print(
                f"{spec['label']}: {n_vid} video + {n_txt} text tokens, {flops / 1e12:.4g} TFLOP/step",
                flush=True,
            )
            print(f"  ({variant}; {len(layouts)} layouts of {world} ranks)", flush=True)
            print(f"  1 GPU: {base_ms:.1f} ms/step", flush=True)
        if world > 1:
            dist.barrier(group=states[0].control_group)  # the others wait for the baseline (gloo, no timeout)
        for state in states:
            pg.activate(state)
            ms, out = time_step(step, device, args.warmup, args.iters, together=True)
            if rank == 0:
                err = rel_err(out, base_out)
                rows.append((state.config.describe(), world, ms, err))
                print(
                    f"  {state.config.describe()}: {ms:.1f} ms/step, {base_ms / ms:.2f}x, rel. err {err:.2e}"
                )
        pg.activate(None)

    if rank == 0 and not args.tiny:
        command = f"torchrun --nproc-per-node {world} benchmarks/bench_parallel.py {' '.join(sys.argv[1:])}"
        for impl, gpus, ms, err in rows:
            record(label, f"{impl} ({variant})", ms, flops / (ms * 1e-3) / 1e12, gpus=gpus, speedup=round(base_ms / ms, 3),
                   rel_err_vs_1gpu=err, command=command)  # fmt: skip
    if world > 1:
        pg.shutdown_distributed()


if __name__ == "__main__":
    main()
