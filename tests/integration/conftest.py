"""Live servers for the integration tests: `python -m diffserve serve ...` in a subprocess on 127.0.0.1 and a
free port, driven over HTTP by the official openai client and httpx.

Servers are expensive (the worker imports torch), so the shared ones are session-scoped; tests that kill
or restart a server start their own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
FAKE_RUNNER = "tests.integration.fake_runner:make_runner"
# uvicorn shuts down gracefully on SIGTERM, then re-raises the signal so the exit status says what ended it
CLEAN_EXIT = (0, -signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


class LiveServer:
    def __init__(self, args: list[str], output_dir: Path, api_key: str | None = None):
        self.args = args
        self.output_dir = output_dir
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = output_dir.parent / f"{output_dir.name}-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> LiveServer:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "diffserve",
            "serve",
            "--port",
            str(self.port),
            "--output-dir",
            str(self.output_dir),
            "--log-level",
            "warning",
            *self.args,
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        env.pop("DIFFSERVE_API_KEY", None)
        # One torch thread in the worker: on 2 cores shared with the API process, the test client and
        # whatever else runs, two OpenMP threads that wait for each other at every op made tiny
        # generations up to 60x slower whenever a core was taken. A deployment setting, not a server one.
        env.setdefault("OMP_NUM_THREADS", "1")
        if self.api_key:
            env["DIFFSERVE_API_KEY"] = self.api_key  # the env fallback, so the key stays out of `ps`
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/liveness", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not come up:\n{self.log_tail()}")

    def wait_healthy(self, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(f"{self.url}/health", timeout=5)
            if r.status_code == 200:
                return r.json()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"server not healthy: {r.text}\n{self.log_tail()}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout)

    def openai(self, **kwargs):
        import openai

        options = {
            "base_url": f"{self.url}/v1",
            "api_key": self.api_key or "unused",
            "max_retries": 0,
            "timeout": 120,
            **kwargs,
        }
        return openai.OpenAI(**options)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus series (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def worker_pid(self) -> int:
        return self.wait_healthy()["worker_pid"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


@pytest.fixture(scope="session")
def tiny_flux_model(tiny_flux_dir) -> str:
    return str(tiny_flux_dir)


@pytest.fixture(scope="session")
def flux_server(tiny_flux_dir, tmp_path_factory):
    """The tiny FLUX model behind an API key, shared by the image tests. Its upload limit is small so that
    the limit can be tested with a small file."""
    server = LiveServer(
        [
            "--model",
            str(tiny_flux_dir),
            "--warmup-resolutions",
            "64x64",
            "--max-upload-bytes",
            "1000000",
            "--served-model-name",
            "flux",
            "--served-model-name",
            "flux-alias",
        ],
        tmp_path_factory.mktemp("flux-out"),
        api_key=API_KEY,
    ).start()
    server.wait_healthy()
    yield server
    code = server.stop()
    assert code in CLEAN_EXIT, f"exit code {code}\n{server.log_tail()}"
