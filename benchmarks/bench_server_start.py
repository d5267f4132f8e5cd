"""Seconds from `diffserve serve` to a warm server (GET /health answers 200), without and with --compile,
the second compiled start reading the first one's persistent Inductor cache.

Three starts in a row, each a fresh process (as a restarted deployment would be), the same model and
DIFFSERVE_CACHE_DIR (a new temporary directory, so the first compiled start is cold):
  eager          `diffserve serve` (the default: eager blocks, CUDA graphs captured in the warm-up)
  compile-cold   `diffserve serve --compile`, empty compile cache: Dynamo traces, Inductor generates code
  compile-warm   the same again: Inductor's kernels come from the cache
After each start one image request is timed through HTTP, to show the warm server serves. The model is
the bundled default (FLUX architecture, 2+4 blocks) unless --model names another; compile time depends on
the block classes, not on the weights' size (regional compilation compiles each block class once).

    python benchmarks/bench_server_start.py [--model PATH] [--size 128x128] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import RESULTS, record  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None  # not listening yet


def start(args, label: str, extra: list[str], env: dict, out_dir: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "diffserve", "serve", "--port", str(port), "--output-dir", str(out_dir)]
    cmd += (["--model", args.model] if args.model else []) + ["--warmup-resolutions", args.size] + extra
    log = open(out_dir / f"{label}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while get_status(f"http://127.0.0.1:{port}/health") != 200:
            if proc.poll() is not None:
                raise SystemExit(f"{label}: the server exited ({proc.returncode}); see {log.name}")
            if time.perf_counter() - t0 > args.timeout:
                raise SystemExit(f"{label}: not warm after {args.timeout} s; see {log.name}")
            time.sleep(0.2)
        warm_s = time.perf_counter() - t0
        width, height = args.size.split("x")
        body = json.dumps({"prompt": "a red circle on a white background", "size": f"{width}x{height}"})
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/images/generations",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        t1 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as r:
            ok = r.status == 200 and "b64_json" in json.loads(r.read())["data"][0]
        request_s = time.perf_counter() - t1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    print(
        f"  {label:13s} warm after {warm_s:7.2f} s; first request {request_s * 1e3:8.1f} ms ({'ok' if ok else 'FAILED'})"
    )
    return {"impl": label, "warm_s": warm_s, "request_ms": request_s * 1e3, "ok": ok}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory or id (default: the bundled model)")
    p.add_argument("--size", default="128x128", help="warm-up and request size WxH")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--record", action="store_true", help=f"append the figures to {RESULTS.name}")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DIFFSERVE_CACHE_DIR": str(Path(tmp) / "cache")}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the server's default cache location is what is measured
        print(f"server start, model {args.model or 'bundled default'}, warm-up {args.size}")
        for label, extra in (("eager", []), ("compile-cold", ["--compile"]), ("compile-warm", ["--compile"])):
            out = Path(tmp) / label
            out.mkdir()
            rows.append(start(args, label, extra, env, out))
    if args.record:
        for row in rows:
            record(
                "server_start",
                row["impl"],
                row["warm_s"] * 1e3,
                path=args.results,
                model=args.model or "bundled default",
                size=args.size,
                first_request_ms=round(row["request_ms"], 1),
                served=row["ok"],
            )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
