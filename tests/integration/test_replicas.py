"""Two `diffserve serve` replicas of the tiny Wan model sharing one PostgreSQL job store (a throw-away
cluster) and one output directory: jobs submitted to one run on both, any replica answers for any job,
a cancel reaches the replica running the job, a killed replica's job is taken over after its lease, and
restarting both loses no completed job. A replica with a directory of its own refuses to start."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.conftest import CLEAN_EXIT, REPO, LiveServer, free_port, process_alive
from tests.integration.test_videos import decode_mp4, wait_for
from tests.pg_cluster import cluster_fixture

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks the Sora API deprecated

LEASE = 3.0  # seconds: short, so that a dead replica's job moves on quickly here
SHORT = {"size": "32x32", "num_frames": 5, "num_inference_steps": 12}
# Seconds per job on a 2-core CI CPU, so that a cancel or a kill surely lands mid-generation: at 128x128 the
# 200 steps (the most a request may ask) finished before the cancel reached them at times.
LONG = {"size": "256x256", "num_frames": 17, "num_inference_steps": 200}


@pytest.fixture(scope="module")
def cluster():
    yield from cluster_fixture()


class Replicas:
    def __init__(self, url: str, model_dir, shared):
        args = ["--model", str(model_dir), "--warmup-resolutions", "32x32", "--served-model-name", "wan"]
        args += ["--job-store", url, "--job-lease", str(LEASE)]
        self.a, self.b = LiveServer(args, shared), LiveServer(args, shared)
        self.a.log_path = shared.parent / "replica-a.log"
        self.b.log_path = shared.parent / "replica-b.log"
        self.url, self.model_dir, self.shared = url, model_dir, shared

    def start(self) -> None:
        # A first: its preflight marks the shared directory; both warm up at the same time.
        self.a.start()
        self.b.start()
        self.a.wait_healthy()
        self.b.wait_healthy()

    def logs(self) -> str:
        return f"--- A ---\n{self.a.log_tail(30)}\n--- B ---\n{self.b.log_tail(30)}"


@pytest.fixture(scope="module")
def replicas(cluster, tiny_wan_dir, tmp_path_factory):
    pair = Replicas(cluster.create_database("replicas"), tiny_wan_dir, tmp_path_factory.mktemp("shared-out"))
    pair.start()
    yield pair
    for server in (pair.a, pair.b):
        assert server.stop() in (*CLEAN_EXIT, -signal.SIGKILL), pair.logs()  # A may still be the killed one


def ran_on(server: LiveServer, job: dict) -> bool:
    """The replica recorded for a job is host:port:pid."""
    return (job.get("replica") or "").split(":")[1:2] == [str(server.port)]


def post(server: LiveServer, body: dict) -> dict:
    with server.http() as http:
        r = http.post("/v1/videos", json={"prompt": "x", **body})
    assert r.status_code == 200, r.text
    return r.json()


def get(server: LiveServer, job_id: str) -> dict:
    with server.http() as http:
        r = http.get(f"/v1/videos/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def running_on_each(replicas, jobs) -> dict:
    """Wait until the two jobs run, one per replica, with some progress: {server: job id}."""

    def placed():
        rows = [get(replicas.b, j["id"]) for j in jobs]
        if all(r["status"] == "in_progress" and r["progress"] > 0 for r in rows):
            return rows
        return None

    rows = wait_for(placed, timeout=60, interval=0.1)
    on_a = [r for r in rows if ran_on(replicas.a, r)]
    on_b = [r for r in rows if ran_on(replicas.b, r)]
    assert len(on_a) == len(on_b) == 1, rows  # a free worker pulls; a busy one does not
    return {"a": on_a[0]["id"], "b": on_b[0]["id"]}


def test_submit_to_a_poll_and_download_from_b(replicas):
    video = replicas.a.openai().videos.create(
        model="wan", prompt="waves", size="32x32", seconds="0.25", extra_body={"num_inference_steps": 4}
    )
    assert video.status == "queued"
    client_b = replicas.b.openai()
    done = wait_for(lambda: (v := client_b.videos.retrieve(video.id)).status == "completed" and v, timeout=60)
    assert done.progress == 100 and done.model_extra["replica"]
    frames = decode_mp4(client_b.videos.download_content(video.id).content)
    assert len(frames) == 5 and frames[0].size == (32, 32)
    assert video.id in [v.id for v in client_b.videos.list(limit=100)]


def test_jobs_submitted_to_a_alone_run_on_both(replicas):
    # jobs of about a second: A is still busy when the later ones arrive, so B takes some (12 tiny jobs were
    # each done by A before the next was posted, at times)
    clip = {"size": "128x128", "num_frames": 17, "num_inference_steps": 50}
    ids = [post(replicas.a, {"prompt": f"clip {i}", **clip})["id"] for i in range(12)]

    def all_done():
        rows = {v["id"]: v for v in httpx.get(f"{replicas.b.url}/v1/videos?limit=100").json()["data"]}
        return [rows[i] for i in ids] if all(rows[i]["status"] == "completed" for i in ids) else None

    rows = wait_for(all_done, timeout=120, interval=0.2)
    on_a = [r["id"] for r in rows if ran_on(replicas.a, r)]
    on_b = [r["id"] for r in rows if ran_on(replicas.b, r)]
    assert len(on_a) + len(on_b) == 12, rows  # each job's replica is recorded
    assert on_a and on_b, f"A ran {len(on_a)}, B ran {len(on_b)}\n{replicas.logs()}"


def test_delete_through_b_cancels_a_job_running_on_a(replicas):
    jobs = [post(replicas.a, {"prompt": f"long {i}", **LONG}) for i in range(2)]
    placed = running_on_each(replicas, jobs)
    stopped = replicas.a.metric("diffserve_worker_cancelled_total")
    with replicas.b.http() as http:
        r = http.delete(f"/v1/videos/{placed['a']}")
    assert r.status_code == 200 and r.json() == {
        "id": placed["a"],
        "object": "video.deleted",
        "deleted": False,
        "status": "cancelled",
    }
    # A's worker itself stopped between two denoising steps, within about one lease renewal
    wait_for(lambda: replicas.a.metric("diffserve_worker_cancelled_total") == stopped + 1, timeout=10)
    row = get(replicas.a, placed["a"])
    assert row["status"] == "cancelled" and row["error"]["code"] == "cancelled" and row["progress"] < 100
    # and the other way round, so that both are free again
    with replicas.a.http() as http:
        assert http.delete(f"/v1/videos/{placed['b']}").json()["status"] == "cancelled"
    next_job = post(replicas.b, SHORT)
    assert wait_for(lambda: get(replicas.a, next_job["id"])["status"] == "completed", timeout=30)


def test_sigkill_of_a_mid_job_moves_its_job_to_b(replicas):
    # long enough that both jobs are running at once and A's is mid-job at the kill (128x128 at 50 steps let
    # one finish before the other started, at times), short enough to run again on B here
    jobs = [post(replicas.b, {"prompt": f"survivor {i}", **LONG}) for i in range(2)]
    placed = running_on_each(replicas, jobs)
    worker = replicas.a.worker_pid()
    replicas.a.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: not process_alive(worker), timeout=15)  # A's orphaned worker notices and exits

    # never stuck: once the lease expires (plus B's next renewal tick, at most a second) it is back in the
    # queue or already on B; the rest of the bound is slack for a CI machine busy with other work
    def moved():
        row = get(replicas.b, placed["a"])
        return row if row["status"] == "queued" or ran_on(replicas.b, row) else None

    wait_for(moved, timeout=LEASE + 15, interval=0.1)
    moved_after = time.monotonic() - killed
    assert moved_after < LEASE + 15, moved_after
    final = wait_for(
        lambda: (r := get(replicas.b, placed["a"]))["status"] not in ("queued", "in_progress") and r,
        timeout=90,
    )
    assert final["status"] == "completed" and ran_on(replicas.b, final), (final, replicas.logs())
    assert wait_for(lambda: get(replicas.b, placed["b"])["status"] == "completed", timeout=60)
    frames = decode_mp4(httpx.get(f"{replicas.b.url}/v1/videos/{placed['a']}/content", timeout=30).content)
    assert len(frames) == 17


def test_restart_both_keeps_every_completed_job(replicas):
    before = httpx.get(f"{replicas.b.url}/v1/videos?limit=100").json()["data"]
    completed = {v["id"]: v for v in before if v["status"] == "completed"}
    assert len(completed) >= 15  # 1 + 12 + 1 + 2 from the tests above
    # a job running when B stops (A is still the killed one): the drain lets it finish (--drain-timeout)
    pending = post(replicas.b, {"prompt": "finish me", **LONG, "num_inference_steps": 20})
    wait_for(lambda: get(replicas.b, pending["id"])["status"] == "in_progress", timeout=30)
    for server in (replicas.a, replicas.b):
        assert server.stop(signal.SIGTERM) in (*CLEAN_EXIT, -signal.SIGKILL), replicas.logs()
    replicas.start()
    finished = get(replicas.b, pending["id"])
    assert finished["status"] == "completed", finished
    completed[pending["id"]] = finished
    for server in (replicas.a, replicas.b):
        listed = {v["id"]: v for v in httpx.get(f"{server.url}/v1/videos?limit=100").json()["data"]}
        assert {i for i, v in listed.items() if v["status"] == "completed"} == set(completed)
        assert all(listed[i]["replica"] == v["replica"] for i, v in completed.items())
    sizes = set()
    for k, job_id in enumerate(completed):
        server = (replicas.a, replicas.b)[k % 2]
        r = httpx.get(f"{server.url}/v1/videos/{job_id}/content", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", (job_id, r.text)
        sizes.add(len(r.content) > 0)
    assert sizes == {True}


def serve_exit(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "diffserve", "serve", "--port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_replica_whose_output_dir_is_not_shared_refuses_to_start(replicas, tmp_path):
    common = ["--model", str(replicas.model_dir), "--job-store", replicas.url]
    run = serve_exit([*common, "--output-dir", str(tmp_path / "local")])
    assert run.returncode == 2, run.stderr
    assert ".diffserve-job-store" in run.stderr and "ReadWriteMany" in run.stderr, run.stderr
    unreachable = "postgresql://diffserve:pw@127.0.0.1:1/none"
    run = serve_exit(
        ["--model", str(replicas.model_dir), "--job-store", unreachable, "--output-dir", str(tmp_path)]
    )
    assert (
        run.returncode == 2 and "cannot connect to the job store postgresql://127.0.0.1:1/none" in run.stderr
    )
    assert ":pw@" not in run.stderr  # the password stays out of the message
