"""Wan image-to-video through a live server and the official openai client: `client.videos.create(...,
input_reference=<file>)` on the tiny Wan2.1-I2V model (native Wan DiT), with real progress, download and
cancellation, and /v1/models naming the native family."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import CLEAN_EXIT, LiveServer
from tests.integration.test_videos import follow, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks the Sora API deprecated


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    from diffserve.testing import make_tiny_model

    model = make_tiny_model("wan-i2v", tmp_path_factory.mktemp("tiny-wan-i2v") / "wan-i2v")
    server = LiveServer(
        ["--model", str(model), "--warmup-resolutions", "32x32", "--served-model-name", "i2v"],
        tmp_path_factory.mktemp("i2v-out"),
    )
    server.start().wait_healthy()
    yield server
    code = server.stop()
    assert code in CLEAN_EXIT, f"exit code {code}\n{server.log_tail()}"


def test_image_to_video_with_the_openai_client(i2v, tmp_path):
    client = i2v.openai()
    (tmp_path / "first.png").write_bytes(_png(96, 40))  # another aspect: resized to cover, centre-cropped
    with open(tmp_path / "first.png", "rb") as f:
        video = client.videos.create(
            model="i2v",
            prompt="the fox turns its head",
            size="64x32",
            input_reference=f,
            extra_body={"num_frames": 5, "num_inference_steps": 12, "seed": 3},
        )
    assert video.status == "queued" and video.size == "64x32"
    v, seen = follow(client, video.id)
    assert v.status == "completed" and v.progress == 100, v
    assert [p for _, p in seen] == sorted(p for _, p in seen)
    assert any(s == "in_progress" and 0 < p < 100 for s, p in seen), seen  # real progress
    with av.open(io.BytesIO(client.videos.download_content(video.id).content)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].size == (64, 32)
    model = next(m for m in client.models.list().data if m.id == "i2v")
    assert (model.id, model.family, model.task, model.accepts_image) == ("i2v", "wan-i2v", "video", True)


def test_without_an_image_the_job_fails_with_the_reason(i2v):
    """The route cannot know that this video model needs an image (it only knows that it takes one): the job
    is accepted and fails with the pipeline's one-line reason."""
    client = i2v.openai()
    video = client.videos.create(model="i2v", prompt="x", size="32x32", extra_body={"num_frames": 5})
    v = wait_for(
        lambda: (r := client.videos.retrieve(video.id)).status not in ("queued", "in_progress") and r
    )
    assert v.status == "failed" and "makes a video from an image: send one" in v.error.message, v


def test_cancel_an_image_to_video_job(i2v):
    client = i2v.openai()
    job = client.videos.create(
        model="i2v",
        prompt="a long one",
        size="128x128",
        input_reference=("first.png", _png(64, 64), "image/png"),
        extra_body={"num_frames": 17, "num_inference_steps": 200},
    )
    wait_for(lambda: client.videos.retrieve(job.id).progress > 0)
    with i2v.http() as http:
        assert http.delete(f"/v1/videos/{job.id}").json()["status"] == "cancelled"
    v = wait_for(lambda: (r := client.videos.retrieve(job.id)).status == "cancelled" and r)
    assert v.progress < 100
