"""What a LoRA adapter on every attention and MLP linear of FLUX.1-dev costs per forward (issue 20's target:
rank 32 at most 5% slower per step than the base model), with the base and the LoRA forward timed in turns
in one process.

bench_dit.py times each variant once, one after the other: its base figure moved by up to 1.4 ms between
runs on the same machine (117.7 to 119.2 ms, one call, 2026-12-04) while the LoRA figure held within 0.2 ms,
so one run's ratio is only good to about a point. Here both CUDA graphs are captured first (the base before
the adapter is attached, its weights kept alive so its graph stays valid), then replayed in alternating
rounds of `--iters` forwards; the ratio of the medians is reported with each round's own ratio, so drift
of the clocks between rounds shows and cancels.

    python benchmarks/lora_overhead.py [--rank 32] [--rounds 6] [--iters 10] [--trace DIR] [--record]

--trace DIR: also a torch.profiler trace of one eager forward of each (base_trace.json, lora_trace.json,
with input shapes), to see which kernels the adapter adds or widens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dit import attach_bench_lora, build_pair  # noqa: E402
from dit_specs import FULL, make_inputs  # noqa: E402
from harness import bench_device  # noqa: E402
from record import record  # noqa: E402


def _capture(model, inputs):
    from diffserve.runtime.cuda_graphs import CapturedForward

    graph = CapturedForward(inputs)
    graph.warm_up(lambda **kw: model(**kw, return_dict=False)[0], inputs)
    graph.capture(lambda **kw: model(**kw, return_dict=False)[0])
    return graph


def _round_ms(graph, iters: int) -> float:
    """Median ms of `iters` replays, each timed by its own CUDA events."""
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _trace(model, inputs, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    model(**inputs, return_dict=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds of each graph")
    p.add_argument("--iters", type=int, default=10, help="forwards per round")
    p.add_argument("--trace", type=Path, default=None, help="write eager profiler traces there")
    p.add_argument("--record", action="store_true", help="append the figures to benchmarks/results.jsonl")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.iters < 1:
        p.error("--rounds and --iters must be at least 1")
    device = bench_device(False, "lora_overhead.py")
    if device is None:
        return 2
    from diffserve.kernels import fused_ops

    spec = FULL["flux"]
    dtype = torch.bfloat16
    ref, ours = build_pair("flux", spec["config"], device, dtype)
    inputs, _, _, flops = make_inputs("flux", spec["config"], spec["shape"], 1, device, dtype)
    fused_ops.set_fused_ops(True)
    ours.fuse_projections()
    with torch.inference_mode():
        base = _capture(ours, inputs)
        if args.trace:
            args.trace.mkdir(parents=True, exist_ok=True)
            _trace(ours, inputs, args.trace / "base_trace.json")
        # attaching moves the weights into wider buffers: the old ones stay referenced here (and by ref),
        # so the base graph, which reads them by address, still computes the base model
        kept = [t for t in ours.state_dict(keep_vars=True).values()] + [b for _, b in ours.named_buffers()]
        state: dict = {}
        attach_bench_lora(ours, args.rank, state)
        lora = _capture(ours, inputs)
        if args.trace:
            _trace(ours, inputs, args.trace / "lora_trace.json")
        for graph in (base, lora):  # warm: clocks up, caches filled
            _round_ms(graph, args.iters)
        rows = []
        for r in range(args.rounds):
            order = (base, lora) if r % 2 == 0 else (lora, base)
            ms = {id(g): _round_ms(g, args.iters) for g in order}
            rows.append((ms[id(base)], ms[id(lora)]))
    del kept
    b_ms = statistics.median(b for b, _ in rows)
    l_ms = statistics.median(lo for _, lo in rows)
    ratios = [lo / b - 1 for b, lo in rows]
    print(f"FLUX.1-dev {spec['shape']['height']}^2, rank {args.rank} on every attention and MLP linear")
    print("| round | base ms | LoRA ms | LoRA over base |\n|---:|---:|---:|---:|")
    for i, (b, lo) in enumerate(rows):
        print(f"| {i} | {b:.2f} | {lo:.2f} | {100 * (lo / b - 1):+.2f}% |")
    print(
        f"median: base {b_ms:.2f} ms, LoRA {l_ms:.2f} ms, {100 * (l_ms / b_ms - 1):+.2f}% "
        f"(rounds {100 * min(ratios):+.2f}% to {100 * max(ratios):+.2f}%)"
    )
    if args.record:
        common = dict(model=spec["label"], rounds=args.rounds, iters=args.iters, rank=args.rank)
        record("lora_overhead_flux", "ours-graph", b_ms, flops / (b_ms * 1e-3) / 1e12, **common)
        record(
            "lora_overhead_flux", "ours-graph-lora", l_ms, flops / (l_ms * 1e-3) / 1e12,
            overhead_pct=round(100 * (l_ms / b_ms - 1), 2),
            round_overhead_pct=[round(100 * x, 2) for x in ratios], **common,
        )  # fmt: skip
    del ref
    return 0


if __name__ == "__main__":
    sys.exit(main())
