"""--offload on a small GPU: FLUX.1-dev 1024^2, 28 steps, end to end (text encoders, denoise, VAE decode,
through diffserve's runner), each configuration in its own process, optionally capped with
torch.cuda.set_per_process_memory_fraction (the issue's cap: 24 GiB, a "24 GB" card's memory, of the
H200's 139 GiB). Reports per configuration the median seconds per generation, the peak memory the caching allocator reserved (what
the cap limits; nvidia-smi shows ~0.5 GB more, the CUDA context) and allocated, and the slowdown against
the first configuration (by default the uncapped resident model), and appends one row each to
benchmarks/results.jsonl (record.py).

    # full-size random FLUX.1-dev (33.7 GB, built on the GPU once, bench_serving.make_checkpoint), then the runs
    python benchmarks/bench_offload.py --model /tmp/flux-dev
    # pick the configurations: MODE[+fp8][@CAP_GIB], MODE none|model|layerwise; --baseline S: the slowdown
    # against an earlier run's seconds per generation (when the configurations are split over several runs)
    python benchmarks/bench_offload.py --model /tmp/flux-dev --configs layerwise@24 layerwise+fp8@24 --baseline 3.4
    # through a live `diffserve serve` (HTTP, the worker capping its own memory: capped_runner), one
    # request at a time; the peak is nvidia-smi's memory.used of the GPU (the CUDA context included)
    python benchmarks/bench_offload.py --model /tmp/flux-dev --serve --configs layerwise@24 --baseline 3.6
    # the tiny model on the CPU (a check of the script; caps are ignored there)
    python benchmarks/bench_offload.py --tiny --no-record [--serve]

Why these configurations: the FLUX.1-dev DiT alone is 23.8 GB in bf16, so under a 24 GB cap only
`layerwise` fits in bf16; with --quantization fp8 (DiT linears halved) `model` may fit too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import RESULTS, record  # noqa: E402

DEFAULT_CONFIGS = ["none", "model", "layerwise@24", "layerwise+fp8@24", "model+fp8@24"]


def parse_config(text: str) -> dict:
    """'layerwise+fp8@24' -> {'offload': 'layerwise', 'quantization': 'fp8', 'cap_gib': 24.0}."""
    spec, _, cap = text.partition("@")
    mode, *flags = spec.split("+")
    if mode not in ("none", "model", "layerwise") or any(f != "fp8" for f in flags):
        raise ValueError(f"configuration {text!r}: use MODE[+fp8][@CAP_GIB], MODE none|model|layerwise")
    return {
        "name": text,
        "offload": None if mode == "none" else mode,
        "quantization": "fp8" if flags else None,
        "cap_gib": float(cap) if cap else None,
    }


def measure(config: dict, model: str, device: str, size: int, steps: int, runs: int) -> dict:
    """One configuration in this process: load, one warm-up generation, `runs` timed ones."""
    import torch

    from diffserve.runtime.api import GenerationRequest
    from diffserve.runtime.config import RuntimeConfig
    from diffserve.runtime.runner import load_runner

    cuda = device.startswith("cuda")
    if cuda and config["cap_gib"] is not None:
        # Before the first allocation: the caching allocator refuses to reserve beyond this fraction.
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config["cap_gib"] * 2**30 / total))
    start = time.perf_counter()
    runner = load_runner(
        RuntimeConfig(
            model=model, device=device, offload=config["offload"], quantization=config["quantization"]
        )
    )
    load_s = time.perf_counter() - start
    req = dict(prompt="a lighthouse at dusk", width=size, height=size, num_inference_steps=steps, seed=0)
    times, stages = [], []
    for i in range(runs + 1):  # the first: warm-up (graph captures, first kernel launches)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = runner.generate(GenerationRequest(**req))
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
            stages.append(result.timings)
    out = {
        "config": config["name"],
        "load_s": round(load_s, 1),
        "runs_s": [round(t, 3) for t in times],
        "s": statistics.median(times),
        "denoise_s": statistics.median(s.get("denoise", 0.0) for s in stages),
    }
    if cuda:
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def capped_runner(runtime):
    """`diffserve serve --runner-factory benchmarks.bench_offload:capped_runner` (the --serve mode): the
    worker caps its own CUDA memory at $BENCH_OFFLOAD_CAP_GIB (a variable of this script only) before
    loading, then loads as the default factory does."""

    import torch

    from diffserve.runtime.distributed.launch import load_parallel_runner

    cap = os.environ.get("BENCH_OFFLOAD_CAP_GIB")
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total))
    return load_parallel_runner(runtime)


def gpu_memory_used_gib() -> float | None:
    """nvidia-smi's memory.used of GPU 0 (every process on it; n/a without nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return float(out.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def serve_config(config: dict, args, device: str | None) -> dict:
    """One configuration through a live server: warm-up at the size, then `runs` requests one at a time,
    GPU memory sampled every 100 ms from the start of the server."""
    import threading

    import httpx

    from benchmarks.bench_serving import Server

    serve = ["--model", args.model, "--warmup-resolutions", f"{args.size}x{args.size}"]
    serve += ["--runner-factory", "benchmarks.bench_offload:capped_runner"]
    # One request per forward: a batch's activations (and its VAE decode) would not fit a 24 GiB card anyway,
    # and the warm-up then runs batch 1 only.
    serve += ["--max-batch", "1"]
    serve += ["--offload", config["offload"]] if config["offload"] else []
    serve += ["--quantization", config["quantization"]] if config["quantization"] else []
    serve += ["--device", device] if device else []
    # the repo for --runner-factory, in front of the caller's PYTHONPATH (where its packages may live)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": pythonpath, "BENCH_OFFLOAD_CAP_GIB": str(config["cap_gib"] or "")}
    peak, sampling = [0.0], threading.Event()

    def sample():
        while not sampling.wait(0.1):
            peak[0] = max(peak[0], gpu_memory_used_gib() or 0.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    server = Server(serve, timeout=900, env=env)
    try:
        start = time.perf_counter()
        server.wait_healthy()
        ready_s = time.perf_counter() - start
        body = {"prompt": "a lighthouse at dusk", "size": f"{args.size}x{args.size}", "seed": 0}
        body |= {"num_inference_steps": args.steps, "response_format": "b64_json"}
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            r = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=600)
            if r.status_code != 200:
                return {"config": config["name"], "error": f"HTTP {r.status_code}: {r.text[:200]}"}
            times.append(time.perf_counter() - t0)
    except RuntimeError as e:
        tail = server.tail(400)
        oom = "OutOfMemoryError" in tail or "out of memory" in tail
        return {"config": config["name"], "error": "out of memory" if oom else str(e).splitlines()[0]}
    finally:
        server.stop()
        sampling.set()
        sampler.join()
    out = {"config": config["name"], "via": "http", "ready_s": round(ready_s, 1)}
    out |= {"runs_s": [round(t, 3) for t in times], "s": statistics.median(times), "denoise_s": None}
    if gpu_memory_used_gib() is not None:
        out["peak_gpu_used_gib"] = round(peak[0], 2)
    return out


def run_child(config: dict, args) -> dict:
    """measure() in a fresh process: its own cap, its own peak, nothing cached from the previous one."""
    cmd = [sys.executable, __file__, "--child", json.dumps(config), "--model", args.model]
    cmd += ["--size", str(args.size), "--steps", str(args.steps), "--runs", str(args.runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        return {"config": config["name"], "error": "out of memory" if oom else tail}
    return json.loads(lines[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a FLUX.1-dev directory (default: build random full-size weights there)")
    p.add_argument(
        "--configs", nargs="+", default=None, help=f"MODE[+fp8][@CAP_GIB] (default {DEFAULT_CONFIGS})"
    )
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--runs", type=int, default=2, help="timed generations per configuration (median)")
    p.add_argument(
        "--baseline",
        type=float,
        help="seconds per generation to state slowdowns against (an earlier run's `none`); default: the first "
        "configuration of this run",
    )
    p.add_argument("--serve", action="store_true", help="through a live `diffserve serve` (HTTP) per config")
    p.add_argument("--tiny", action="store_true", help="CPU, the tiny FLUX model, in this process")
    p.add_argument("--no-record", dest="record", action="store_false")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)  # one configuration as JSON (run_child)
    args = p.parse_args(argv)
    try:
        args.parsed = [parse_config(c) for c in (args.configs or DEFAULT_CONFIGS)]
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(
            json.dumps(measure(json.loads(args.child), args.model, "cuda", args.size, args.steps, args.runs))
        )
        return 0
    tiny_dir = None
    if args.tiny:
        from diffserve.testing import make_tiny_model

        tiny_dir = tempfile.TemporaryDirectory(prefix="bench-offload-tiny-")
        args.model = str(make_tiny_model("flux", Path(tiny_dir.name) / "flux"))
        if args.size == 1024:
            args.size, args.steps = 64, 2
        if args.serve:
            rows = [serve_config(c, args, "cpu") for c in args.parsed]
        else:
            rows = [measure(c, args.model, "cpu", args.size, args.steps, args.runs) for c in args.parsed]
        tiny_dir.cleanup()
    else:
        if args.model is None or not (Path(args.model) / "model_index.json").exists():
            from benchmarks.bench_serving import make_checkpoint

            args.model = args.model or "/tmp/flux-dev-random"
            make_checkpoint(Path(args.model), "dev")
        rows = [serve_config(c, args, None) if args.serve else run_child(c, args) for c in args.parsed]
    base = args.baseline or rows[0].get("s")
    against = f"{args.baseline} s" if args.baseline else rows[0]["config"]
    print(f"FLUX.1 {args.size}^2, {args.steps} steps; slowdown against {against}")
    print(
        "| config | s / generation | denoise s | peak reserved GiB | peak allocated GiB "
        "| nvidia-smi peak GiB | slowdown |"
    )
    print("|---|---|---|---|---|---|---|")
    keys = ("s", "denoise_s", "peak_reserved_gib", "peak_allocated_gib", "peak_gpu_used_gib")
    for row in rows:
        if "error" in row:
            print(f"| {row['config']} | {row['error']} | | | | | |")
            continue
        if base:
            row["slowdown"] = round(row["s"] / base, 2)
        cells = [f"{row[k]:.2f}" if row.get(k) else "n/a" for k in keys]
        print(f"| {row['config']} | " + " | ".join(cells) + f" | {row.get('slowdown')}x |")
        if args.record:
            where = ("_http" if args.serve else "") + ("_tiny_cpu" if args.tiny else "")
            record(
                f"offload_flux_{args.size}_{args.steps}steps{where}",
                f"diffserve-{row['config']}",
                row["s"] * 1000,
                path=args.results,
                **{k: v for k, v in row.items() if k not in ("s",)},
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
