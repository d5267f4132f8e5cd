"""What the server adds to one image generation: the same request timed through HTTP and as a direct
runtime call, on the CPU with the tiny FLUX model (so the model's own time is small and the overhead shows).

  direct           runner.generate(req) + encode_image(png)   (in this process: the bytes the server makes)
  http             POST /v1/images/generations, b64_json, to a live `diffserve serve` on 127.0.0.1
                   (validation, admission, pickling to the worker process and back, base64, JSON, HTTP)

The two alternate, one pair per iteration and never at the same time, so that whatever else the machine
runs weighs on both alike. Figures: the median of each over --iters pairs after --warmup pairs, and the
server overhead = the median of the per-pair differences (http - direct).

    python benchmarks/bench_server_overhead.py [--iters 30] [--size 96x64] [--steps 4] [--model DIR]

Each figure is appended to benchmarks/results.jsonl (benchmarks/record.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import record  # noqa: E402


@contextmanager
def live_server(model: str, size: tuple[int, int]):
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_dir = tempfile.TemporaryDirectory(prefix="diffserve-bench-")  # images and the job database
    out = out_dir.name
    cmd = [
        sys.executable,
        "-m",
        "diffserve",
        "serve",
        "--model",
        model,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--output-dir",
        out,
        "--warmup-resolutions",
        f"{size[0]}x{size[1]}",
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(cmd, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy")
            time.sleep(0.1)
        with httpx.Client(base_url=url, timeout=120) as http:
            yield http
    finally:
        server.terminate()
        server.wait(60)
        out_dir.cleanup()


def measure(model: str, size: tuple[int, int], steps: int, iters: int, warmup: int) -> tuple[list, list]:
    from diffserve.runtime.api import GenerationRequest
    from diffserve.runtime.outputs import encode_image
    from diffserve.runtime.runner import load_runner

    prompt = "a red square on a blue field"
    body = {
        "prompt": prompt,
        "size": f"{size[0]}x{size[1]}",
        "num_inference_steps": steps,
        "seed": 0,
        "response_format": "b64_json",
    }
    req = GenerationRequest(prompt=prompt, width=size[0], height=size[1], num_inference_steps=steps, seed=0)
    with live_server(model, size) as http:
        runner = load_runner(model, device="cpu")
        runner.warmup([size])

        def direct():
            encode_image(runner.generate(req).images[0], "png")

        def through_http():
            http.post("/v1/images/generations", json=body).raise_for_status()

        direct_ms, http_ms = [], []
        for i in range(warmup + iters):
            for fn, times in ((direct, direct_ms), (through_http, http_ms)):
                time.sleep(0.05)  # let the other side's threads go idle
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000)
    return direct_ms, http_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a diffusers model directory (default: a tiny FLUX model built now)")
    parser.add_argument("--size", default="96x64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--results", type=Path, help="append here instead of benchmarks/results.jsonl")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="tiny-flux-") as tmp:
        model = args.model
        if model is None:
            from diffserve.testing import make_tiny_model

            model = str(make_tiny_model("flux", Path(tmp) / "flux"))
        direct_ms, http_ms = measure(model, size, args.steps, args.iters, args.warmup)
    direct, http = statistics.median(direct_ms), statistics.median(http_ms)
    overhead = statistics.median(h - d for h, d in zip(http_ms, direct_ms, strict=True))
    name = f"server overhead: tiny FLUX {size[0]}x{size[1]}, {args.steps} steps, CPU"
    extra = {"device": "cpu", "iters": args.iters, "cpus": os.cpu_count()}
    record(name, "direct", direct, path=args.results, **extra)
    record(name, "http", http, path=args.results, overhead_ms=round(overhead, 3), **extra)
    print(f"{name}: median of {args.iters} alternating pairs")
    print(f"  direct runtime call (generate + PNG) {direct:9.2f} ms")
    print(f"  through HTTP                         {http:9.2f} ms")
    print(f"  server overhead (median difference)  {overhead:9.2f} ms ({100 * overhead / direct:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
