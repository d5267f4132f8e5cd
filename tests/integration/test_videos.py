"""The videos API on the tiny Wan model: the openai client's job flow, listing, cancellation by DELETE,
what a video model refuses, and jobs surviving restarts (SIGTERM drains; a crash fails what was in flight)."""

from __future__ import annotations

import io
import signal
import time

import av
import openai
import pytest

from tests.integration.conftest import CLEAN_EXIT, LiveServer, process_alive

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks the Sora API deprecated

SMALL = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def wan(tiny_wan_dir, tmp_path_factory):
    server = LiveServer(
        ["--model", str(tiny_wan_dir), "--warmup-resolutions", "64x64", "--served-model-name", "wan"],
        tmp_path_factory.mktemp("wan-out"),
    )
    server.start().wait_healthy()
    yield server
    assert server.stop() in CLEAN_EXIT, server.log_tail()


def decode_mp4(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_image() for f in container.decode(video=0)]


def follow(client, video_id: str):
    """Poll a video job until it ends: (the last retrieve, every (status, progress) seen on the way)."""
    seen = []
    while True:
        v = client.videos.retrieve(video_id)
        seen.append((v.status, v.progress))
        if v.status not in ("queued", "in_progress"):
            return v, seen
        time.sleep(0.02)


def wait_for(predicate, timeout: float = 60, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def test_openai_video_flow(wan):
    client = wan.openai()
    video = client.videos.create(
        model="wan",
        prompt="waves on a beach",
        size="64x48",
        seconds="0.5",
        extra_body={"num_inference_steps": 12},
    )
    assert video.object == "video" and video.status == "queued" and video.progress == 0
    assert video.seconds == "0.5" and video.size == "64x48" and video.id.startswith("video_")
    v, seen = follow(client, video.id)
    assert v.status == "completed" and v.progress == 100 and v.completed_at >= v.created_at, v
    progress = [p for _, p in seen]
    assert progress == sorted(progress)  # never goes back
    assert any(s == "in_progress" and 0 < p < 100 for s, p in seen), seen  # real progress, not 0 then 100
    frames = decode_mp4(client.videos.download_content(video.id).content)
    # 0.5 s at the model's 16 fps: 8 frames after the first, which Wan's VAE encodes alone
    assert len(frames) == 9 and frames[0].size == (64, 48)


def test_create_and_poll_with_num_frames(wan):
    client = wan.openai()
    video = client.videos.create_and_poll(
        prompt="a slow pan", size="48x32", extra_body={"num_frames": 5, "steps": 2, "seed": 3}
    )
    assert video.status == "completed" and video.seconds == "0.25"
    frames = decode_mp4(client.videos.download_content(video.id).content)
    assert len(frames) == 5 and frames[0].size == (48, 32)


def test_list_and_paginate(wan):
    client = wan.openai()
    ids = [
        client.videos.create(prompt=f"clip {i}", size="32x32", extra_body={"num_frames": 5, **SMALL}).id
        for i in range(3)
    ]
    newest_first = [v.id for v in client.videos.list(limit=100)]
    assert newest_first[:3] == ids[::-1]
    page = client.videos.list(limit=2, order="asc")
    assert len(page.data) == 2 and page.has_more and page.last_id == page.data[-1].id
    assert [v.id for v in client.videos.list(limit=100, order="asc")] == newest_first[::-1]
    assert [v.id for v in client.videos.list(limit=100, after=ids[2])][:2] == ids[1::-1]
    for i in ids:
        wait_for(lambda i=i: client.videos.retrieve(i).status == "completed")


def test_delete_cancels_in_flight_job(wan):
    client = wan.openai()
    stopped = wan.metric("diffserve_worker_cancelled_total")
    job = client.videos.create(
        prompt="a very long clip", size="128x128", extra_body={"num_frames": 17, "steps": 200}
    )
    wait_for(lambda: client.videos.retrieve(job.id).progress > 0)
    with wan.http() as http:
        r = http.delete(f"/v1/videos/{job.id}")
    assert r.status_code == 200 and r.json() == {
        "id": job.id,
        "object": "video.deleted",
        "deleted": False,
        "status": "cancelled",
    }
    # the worker itself stopped between two denoising steps, long before its 200 steps
    wait_for(lambda: wan.metric("diffserve_worker_cancelled_total") == stopped + 1, timeout=20)
    v = client.videos.retrieve(job.id)
    assert v.status == "cancelled" and v.error.code == "cancelled" and v.progress < 100
    with pytest.raises(openai.ConflictError):
        client.videos.download_content(job.id)
    # the worker is free for the next job
    assert (
        client.videos.create_and_poll(
            prompt="next", size="32x32", extra_body={"num_frames": 5, **SMALL}
        ).status
        == "completed"
    )
    # a second DELETE removes the cancelled job
    assert client.videos.delete(job.id).deleted is True


def test_delete_completed_job_removes_it(wan):
    client = wan.openai()
    video = client.videos.create_and_poll(prompt="short", size="32x32", extra_body={"num_frames": 5, **SMALL})
    path = wan.output_dir / "videos" / f"{video.id}.mp4"
    assert path.is_file()
    deleted = client.videos.delete(video.id)
    assert deleted.deleted is True and deleted.object == "video.deleted"
    assert not path.exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_what_a_video_model_refuses(wan):
    client = wan.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(model="wan", image=("x.png", b"\x89PNG", "image/png"), prompt="x")
    assert e.value.body["code"] == "unsupported_task"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="wan", prompt="x")
    assert e.value.body["code"] == "unsupported_task"
    bad = [
        ({"size": "1024x1024"}, "size"),  # tiny Wan's largest side is 512
        ({"size": "50x64"}, "size"),
        ({"num_frames": 10}, "num_frames"),  # not k*4+1
        ({"num_frames": 5, "seconds": "1"}, "seconds"),
        ({"seconds": "-1"}, "seconds"),
        ({"seconds": "a lot"}, "seconds"),
        ({"steps": 0}, "steps"),
        ({"input_reference": {"image_url": "data:image/png;base64,AAAA"}}, "input_reference"),
    ]
    with wan.http() as http:
        for extra, param in bad:
            r = http.post("/v1/videos", json={"prompt": "x", **extra})
            assert r.status_code == 400, (extra, r.text)
            assert r.json()["error"]["param"] in (param, "num_inference_steps"), (extra, r.json())
        r = http.post(
            "/v1/videos", data={"prompt": "x"}, files={"input_reference": ("r.png", b"png", "image/png")}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"
        r = http.post("/v1/videos", data={"prompt": "x"}, files={"reference": ("r.png", b"png", "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reference"


def test_restart_keeps_completed_jobs_and_drains_on_sigterm(wan):
    client = wan.openai()
    done = client.videos.create_and_poll(
        prompt="keep me", size="32x32", extra_body={"num_frames": 5, **SMALL}
    )
    data = client.videos.download_content(done.id).content
    pending = client.videos.create(prompt="finish me", size="32x32", extra_body={"num_frames": 5, "steps": 8})
    assert wan.stop(signal.SIGTERM) in CLEAN_EXIT  # the drain lets `pending` finish first
    wan.start().wait_healthy()
    client = wan.openai()
    listed = {v.id: v for v in client.videos.list(limit=100)}
    assert listed[done.id].status == "completed"
    assert listed[pending.id].status == "completed", listed[pending.id]
    assert client.videos.download_content(done.id).content == data
    assert len(decode_mp4(client.videos.download_content(pending.id).content)) == 5


def test_crash_fails_in_flight_jobs_with_a_reason(wan):
    client = wan.openai()
    job = client.videos.create(
        prompt="interrupted", size="128x128", extra_body={"num_frames": 17, "steps": 200}
    )
    wait_for(lambda: client.videos.retrieve(job.id).progress > 0)
    worker = wan.worker_pid()
    wan.stop(signal.SIGKILL)
    wait_for(lambda: not process_alive(worker), timeout=15)  # the orphaned worker notices and exits
    wan.start().wait_healthy()
    v = wan.openai().videos.retrieve(job.id)
    assert v.status == "failed" and v.error.code == "server_restarted" and "restarted" in v.error.message
