"""Serving throughput: N concurrent clients against a live `diffserve serve`, for a fixed number of
requests or a fixed duration. Reports requests/s, latency p50/p95 (client side: POST to the last byte of
the b64_json answer), the GPU busy fraction (nvidia-smi's utilization.gpu sampled every 100 ms during the
measured window, averaged over the GPUs; n/a without nvidia-smi) and the mean batch the server formed
(diffserve_batch_requests, from /metrics), and appends one row to benchmarks/results.jsonl (record.py).

    # against a running server
    python benchmarks/bench_serving.py --url http://127.0.0.1:8000 --size 1024x1024 --steps 28 -c 4 -r 40
    # start the server too (everything after -- goes to `diffserve serve`; --port/--output-dir are set here)
    python benchmarks/bench_serving.py --start-server --size 512x512 --steps 4 -c 16 --duration 60 \
        -- --model /models/FLUX.1-schnell --warmup-resolutions 512x512 --max-batch 8
    # the same with batching off: ... -- --model ... --max-batch 1
    # the tiny model on the CPU (a check of the script): --tiny builds it and serves it on the CPU
    python benchmarks/bench_serving.py --start-server --tiny --size 64x64 --steps 2 -c 4 -r 12
    # the first requests after a start, one at a time: n=2 twice, then n=1 twice (issue 23: the first n=2
    # no slower than the second); one row with the four latencies, instead of the load
    python benchmarks/bench_serving.py --start-server --first-requests -- --model DIR --max-batch 4 ...
    # a full-size FLUX.1 checkpoint with random weights (bf16, 33.7 GB; built on the GPU), then exit
    python benchmarks/bench_serving.py --make-checkpoint /tmp/flux-dev [--variant schnell]

Requests are identical and unseeded by default (any runner merges those: tickets.merge_key);
--distinct gives each request its own prompt, seed and guidance scale, as real traffic has: the native
FLUX pipeline still runs them in one forward (each keeping its own seed), a runner without sample
batching runs them one by one. Requests that fail are counted (`errors`) and left out of the latency
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import RESULTS, record  # noqa: E402

# ---- GPU busy fraction -------------------------------------------------------------------------------


class GpuSampler:
    """nvidia-smi's utilization.gpu (the share of the last sample period in which a kernel ran) every
    100 ms, in a subprocess; samples are stamped on arrival so that the measured window can be cut out."""

    def __init__(self, interval_ms: int = 100, gpus: str | None = None):
        self.samples: list[tuple[float, float]] = []  # (monotonic time, percent), one per GPU per period
        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        cmd = [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", str(interval_ms)]
        if gpus:
            cmd += ["-i", gpus]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.strip())))
            except ValueError:  # "[N/A]" on a GPU that does not report it
                continue

    def busy(self, start: float, end: float) -> float | None:
        window = [p for t, p in self.samples if start <= t <= end]
        return round(statistics.fmean(window) / 100, 4) if window else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)


def gpu_name() -> str:
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run(
                [exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            if out:
                return out.splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


# ---- the server --------------------------------------------------------------------------------------


class Server:
    """`python -m diffserve serve <args>` on a free port of 127.0.0.1, its log in a temporary folder."""

    def __init__(self, serve_args: list[str], timeout: float, env: dict[str, str] | None = None):
        self.args, self.timeout = serve_args, timeout
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-serving-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(self.tmp.name) / "server.log"
        cmd = [sys.executable, "-m", "diffserve", "serve", "--port", str(self.port)]
        cmd += ["--output-dir", str(Path(self.tmp.name) / "out"), *serve_args]
        self.command = cmd
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def wait_healthy(self) -> dict:
        import httpx

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not healthy within {self.timeout:g} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


# ---- the load ----------------------------------------------------------------------------------------


def metric(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return 0.0


async def load(args, url: str, headers: dict[str, str]) -> dict:
    import httpx

    width, height = (int(v) for v in args.size.lower().split("x"))

    def body(i: int) -> dict:
        b = {
            "prompt": f"{args.prompt} #{i}" if args.distinct else args.prompt,
            "size": f"{width}x{height}",
            "num_inference_steps": args.steps,
            "n": args.n,
            "response_format": "b64_json",
        }
        if args.distinct:  # warm-up requests are numbered -1, -2, ...: seeds must be >= 0
            b["seed"] = i if i >= 0 else 10**6 - i
            b["guidance_scale"] = 2.5 + (i % 4) / 2  # 2.5..4: per sample on FLUX.1-dev, unused by schnell
        return b

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as http:

        async def one(i: int) -> tuple[float, int, str]:
            start = time.perf_counter()
            try:
                r = await http.post("/v1/images/generations", json=body(i))
                status, detail = r.status_code, "" if r.status_code == 200 else r.text[:200]
            except httpx.HTTPError as e:
                status, detail = 0, f"{type(e).__name__}: {e}"
            return time.perf_counter() - start, status, detail

        for i in range(args.warmup):  # not measured: first shapes, connections, caches
            await one(-1 - i)
        before = (await http.get("/metrics")).text
        latencies: list[float] = []
        errors: list[str] = []
        counter = iter(range(10**9))
        start = time.monotonic()
        deadline = start + args.duration if args.duration else None

        async def client() -> None:
            while True:
                i = next(counter)
                if deadline is None and i >= args.requests:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    return
                seconds, status, detail = await one(i)
                if status == 200:
                    latencies.append(seconds)
                else:
                    errors.append(f"{status} {detail}")

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        end = time.monotonic()
        after = (await http.get("/metrics")).text
    batches = metric(after, "diffserve_batch_requests_count") - metric(
        before, "diffserve_batch_requests_count"
    )
    merged = metric(after, "diffserve_batch_requests_sum") - metric(before, "diffserve_batch_requests_sum")
    return {
        "start": start,
        "end": end,
        "latencies": latencies,
        "errors": errors,
        "mean_batch": round(merged / batches, 3) if batches else None,
    }


def describe(serve_args: list[str]) -> str:
    """The row's impl: the serve arguments that shape serving (not the model path, port, logs)."""
    skip = {
        "--model",
        "--device",
        "--warmup-resolutions",
        "--port",
        "--output-dir",
        "--log-level",
        "--api-key",
    }
    kept, it = [], iter(serve_args)
    for a in it:
        name = a.split("=", 1)[0]
        if name in skip:
            if "=" not in a:
                next(it, None)
            continue
        kept.append(a)
    return "diffserve " + (shlex.join(kept) if kept else "defaults")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


# ---- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument(
        "--make-checkpoint",
        type=Path,
        metavar="DIR",
        help="write a full-size FLUX.1 checkpoint with random weights to DIR (on the GPU), then exit",
    )
    target.add_argument(
        "--start-server",
        action="store_true",
        help="start `diffserve serve` with the arguments after --, and stop it at the end",
    )
    p.add_argument("--tiny", action="store_true", help="with --start-server: a tiny FLUX model on the CPU")
    p.add_argument(
        "--variant",
        choices=("dev", "schnell"),
        default="dev",
        help="--make-checkpoint: FLUX.1-dev (guidance embedding) or FLUX.1-schnell (none, fixed shift)",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("DIFFSERVE_API_KEY"), help="(default $DIFFSERVE_API_KEY)"
    )
    p.add_argument("--size", default="1024x1024", help="WxH (default 1024x1024)")
    p.add_argument("--steps", type=int, default=28, help="denoising steps (default 28)")
    p.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    p.add_argument("-c", "--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    count = p.add_mutually_exclusive_group()
    count.add_argument("-r", "--requests", type=int, default=None, help="measured requests (default 32)")
    count.add_argument("--duration", type=float, help="seconds of load instead of a request count")
    p.add_argument(
        "--warmup", type=int, default=2, help="requests sent one by one first, not measured (default 2)"
    )
    p.add_argument("--prompt", default="a lighthouse on a cliff at dawn, oil painting")
    p.add_argument(
        "--distinct",
        action="store_true",
        help="a prompt, seed and guidance scale per request (batched only by runners that batch samples)",
    )
    p.add_argument("--gpus", help="GPU indices to sample, e.g. 0 or 0,1 (default: all the host's GPUs)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per request (default 3600)")
    p.add_argument("--server-timeout", type=float, default=1800, help="seconds for the server to warm up")
    p.add_argument(
        "--label", help="the row's impl (default: the serve arguments that matter with --start-server)"
    )
    p.add_argument(
        "--first-requests",
        action="store_true",
        help="time n=2, n=2, n=1, n=1 one by one on a fresh server instead of the load (--n is ignored)",
    )
    p.add_argument("--results", type=Path, default=RESULTS, help=f"append here (default {RESULTS})")
    p.add_argument("--no-record", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.requests is None and args.duration is None:
        args.requests = 32
    if serve_args and not args.start_server:
        p.error("arguments after -- are for --start-server")
    if args.tiny and not args.start_server:
        p.error("--tiny needs --start-server")
    if args.start_server and not args.tiny and "--model" not in serve_args:
        p.error("--start-server needs the server's arguments after --, at least --model DIR (or --tiny)")
    return args, serve_args


def make_checkpoint(path: Path, variant: str, device: str = "cuda") -> Path:
    """A FLUX.1-dev or -schnell directory as diffusers saves one (model_index.json, safetensors), full size
    with random weights in bf16: benchmarks/pipeline_specs.py's pipeline (the one bench_pipeline.py times;
    tiny offline tokenizers, real sequence lengths), built on the GPU. Schnell differs from dev in its DiT's
    missing guidance embedding and its scheduler (no resolution-dependent shift): the same compute."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))  # pipeline_specs imports its siblings by bare name
    import diffusers
    import pipeline_specs

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--make-checkpoint builds the weights on a CUDA GPU")
    start = time.perf_counter()
    if variant == "schnell":
        flux = pipeline_specs.FULL_DIT["flux"]
        saved = dict(flux["config"])
        flux["config"] = {**saved, "guidance_embeds": False}
        try:
            pipe = pipeline_specs.full_reference("flux", torch.device(device), torch.bfloat16)
        finally:
            flux["config"] = saved
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    else:
        pipe = pipeline_specs.full_reference("flux", torch.device(device), torch.bfloat16)
    pipe.save_pretrained(path, safe_serialization=True)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
    print(f"FLUX.1-{variant}, random weights: {path} ({size:.1f} GB) in {time.perf_counter() - start:.0f} s")
    return path


FIRST_REQUESTS = (2, 2, 1, 1)


def first_requests(args, url: str, headers: dict[str, str], health, serve_args: list[str]) -> int:
    """FIRST_REQUESTS' sizes one at a time, the first requests this server has seen (run it on a fresh
    one): each latency, and the first n=2 against the second."""
    import httpx

    seconds = []
    with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as http:
        for n in FIRST_REQUESTS:
            body = {"prompt": args.prompt, "size": args.size, "num_inference_steps": args.steps, "n": n,
                    "response_format": "b64_json"}  # fmt: skip
            start = time.perf_counter()
            r = http.post("/v1/images/generations", json=body)
            seconds.append(round(time.perf_counter() - start, 3))
            print(f"  n={n}: {seconds[-1]:.3f} s (HTTP {r.status_code})", flush=True)
            if r.status_code != 200:
                print(f"  error: {r.text[:200]}")
                return 1
    model = health.get("model", "?") if isinstance(health, dict) else "?"
    name = f"serving {model} {args.size} {args.steps} steps first requests"
    label = args.label or (describe(serve_args) if args.start_server else "diffserve")
    first_vs_second = seconds[0] / seconds[1] - 1
    print(f"{name} ({label}): first n=2 {100 * first_vs_second:+.1f}% against the second")
    if not args.no_record:
        record(name, label, 1000 * seconds[0], path=args.results, device=gpu_name(),
               sizes=list(FIRST_REQUESTS), seconds=seconds, first_vs_second_n2=round(first_vs_second, 4),
               model=model, serve_args=serve_args or None)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args, serve_args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.make_checkpoint is not None:
        make_checkpoint(args.make_checkpoint, args.variant)
        return 0
    server = None
    tiny_dir = None
    try:
        if args.start_server:
            env = {}
            if args.tiny:
                from diffserve.testing import make_tiny_model

                tiny_dir = tempfile.TemporaryDirectory(prefix="bench-serving-tiny-")
                model = make_tiny_model("flux", Path(tiny_dir.name) / "flux")
                serve_args = ["--model", str(model), "--device", "cpu", *serve_args]
                if "--warmup-resolutions" not in serve_args:
                    serve_args += ["--warmup-resolutions", args.size]
                env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
            server = Server(serve_args, args.server_timeout, env)
            print(f"starting: {shlex.join(server.command)}", file=sys.stderr)
            health = server.wait_healthy()
            url = server.url
        else:
            import httpx

            url = args.url.rstrip("/")
            health = httpx.get(f"{url}/health", timeout=10).json()
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        if args.first_requests:
            return first_requests(args, url, headers, health, serve_args)
        sampler = GpuSampler(gpus=args.gpus)
        try:
            run = asyncio.run(load(args, url, headers))
        finally:
            sampler.stop()
    finally:
        if server is not None:
            server.stop()
        if tiny_dir is not None:
            tiny_dir.cleanup()

    lat, errors = run["latencies"], run["errors"]
    elapsed = run["end"] - run["start"]
    done = len(lat)
    busy = sampler.busy(run["start"], run["end"]) if sampler.proc is not None else None
    p50 = percentile(lat, 50) * 1000 if lat else float("nan")
    p95 = percentile(lat, 95) * 1000 if lat else float("nan")
    model = health.get("model", "?") if isinstance(health, dict) else "?"
    # a running server's flags are unknown here: --label says what it runs
    label = args.label or (describe(serve_args) if args.start_server else "diffserve")
    name = f"serving {model} {args.size} {args.steps} steps n={args.n} c={args.concurrency}"
    figures = {
        "requests_per_s": round(done / elapsed, 4) if elapsed > 0 else None,
        "images_per_s": round(done * args.n / elapsed, 4) if elapsed > 0 else None,
        "p50_ms": round(p50, 2),
        "p95_ms": round(p95, 2),
        "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else None,
        "gpu_busy": busy,
        "mean_batch": run["mean_batch"],
        "requests": done,
        "errors": len(errors),
        "seconds": round(elapsed, 3),
        "concurrency": args.concurrency,
        "size": args.size,
        "steps": args.steps,
        "n": args.n,
        "distinct": args.distinct,
        "model": model,
        "serve_args": serve_args or None,
    }
    print(f"{name} ({label})")
    print(f"  {done} requests in {elapsed:.2f} s, {len(errors)} errors")
    print(f"  throughput     {figures['requests_per_s']} requests/s ({figures['images_per_s']} images/s)")
    print(f"  latency        p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    print(f"  GPU busy       {'n/a' if busy is None else f'{100 * busy:.1f}%'}")
    print(f"  mean batch     {run['mean_batch'] if run['mean_batch'] is not None else 'n/a'}")
    for e in errors[:5]:
        print(f"  error: {e}")
    if not args.no_record and done:
        row = record(name, label, p50, path=args.results, device=gpu_name(), **figures)
        print(f"  recorded in {args.results}:\n{json.dumps(row)}")
    return 0 if done and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
