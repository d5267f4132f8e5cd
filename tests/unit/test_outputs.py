"""Output encoding: images decode to the requested size, MP4s (decoded with PyAV) to the requested size and
frame count, H.264 in yuv420p; no torch in the encoding module."""

from __future__ import annotations

import io
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from diffserve.runtime.api import GenerationResult
from diffserve.runtime.outputs import (
    encode_image,
    encode_video,
    output_format,
    output_paths,
    save_result,
)


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _decode_mp4(data: bytes):
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        codec, pix_fmt, rate = stream.codec_context.name, stream.codec_context.pix_fmt, stream.average_rate
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return codec, pix_fmt, rate, frames


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_image_formats_decode_with_size(fmt, pil_format):
    image = _noise_image(96, 64)
    decoded = Image.open(io.BytesIO(encode_image(image, fmt)))
    assert decoded.format == pil_format and decoded.size == (96, 64) and decoded.mode == "RGB"


def test_png_is_lossless_and_rgba_is_flattened():
    image = _noise_image(33, 17)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_image(image)))), np.asarray(image))
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 40))
    assert Image.open(io.BytesIO(encode_image(rgba, "jpeg"))).mode == "RGB"


def test_unknown_image_format():
    with pytest.raises(ValueError, match="unknown image format 'gif'"):
        encode_image(_noise_image(8, 8), "gif")


def test_mp4_has_requested_frames_size_and_codec():
    # A gradient that moves: frames differ, so a frame-dropping encoder would be caught.
    frames = []
    for i in range(9):
        arr = np.zeros((48, 64, 3), dtype=np.uint8)
        arr[..., 0] = (np.arange(64)[None, :] * 4 + i * 20) % 256
        arr[..., 1] = 128
        frames.append(Image.fromarray(arr))
    codec, pix_fmt, rate, decoded = _decode_mp4(encode_video(frames, fps=16))
    assert (codec, pix_fmt, rate) == ("h264", "yuv420p", 16)
    assert len(decoded) == 9 and decoded[0].shape == (48, 64, 3)
    # Lossy, but close to what went in (crf 18).
    for src, out in zip(frames, decoded, strict=True):
        assert np.abs(np.asarray(src).astype(int) - out.astype(int)).mean() < 6


def test_mp4_single_frame_and_odd_sizes():
    _, _, _, decoded = _decode_mp4(encode_video([_noise_image(33, 21)], fps=8))
    assert len(decoded) == 1 and decoded[0].shape == (20, 32, 3)  # yuv420p needs even sides


def test_mp4_rejects_empty_video():
    with pytest.raises(ValueError, match="at least one frame"):
        encode_video([])


def test_output_format_from_extension():
    assert [output_format(p) for p in ("a.png", "b.JPG", "c.jpeg", "d.webp", "e.mp4")] == [
        "png",
        "jpeg",
        "jpeg",
        "webp",
        "mp4",
    ]
    with pytest.raises(ValueError, match="cannot tell the output format"):
        output_format("out.gif")


def test_output_paths_numbered_for_several():
    assert [p.name for p in output_paths("x/out.png", 1)] == ["out.png"]
    assert [p.name for p in output_paths("x/out.png", 3)] == ["out-0.png", "out-1.png", "out-2.png"]


def test_save_result_checks_kind(tmp_path):
    images = GenerationResult(images=[_noise_image(16, 16)], width=16, height=16)
    with pytest.raises(ValueError, match="makes images"):
        save_result(images, tmp_path / "x.mp4")
    video = GenerationResult(videos=[[_noise_image(16, 16)] * 5], fps=8, width=16, height=16)
    with pytest.raises(ValueError, match="makes videos"):
        save_result(video, tmp_path / "x.png")
    (path,) = save_result(video, tmp_path / "sub" / "v.mp4")
    assert len(_decode_mp4(path.read_bytes())[3]) == 5


def test_outputs_module_does_not_import_torch():
    code = "import sys, diffserve.runtime.outputs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
