"""Encode generated images (PNG/JPEG/WebP through Pillow) and videos (MP4, H.264, yuv420p through PyAV).

No torch here: the server's API process encodes and serves bytes without importing it.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
VIDEO_FORMATS = {"mp4"}


def encode_image(image, fmt: str = "png", quality: int | None = None) -> bytes:
    """A PIL image -> bytes in `fmt` ("png" | "jpeg" | "webp"). quality applies to JPEG/WebP (default 95)."""
    key = fmt.lower()
    if key not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}: use png, jpeg or webp")
    buf = io.BytesIO()
    options = {} if key == "png" else {"quality": quality or 95}
    image.convert("RGB").save(buf, format=IMAGE_FORMATS[key], **options)
    return buf.getvalue()


def encode_video(frames: list, fps: int = 16, crf: int = 18) -> bytes:
    """PIL frames -> an MP4 (H.264, yuv420p, which every player decodes). yuv420p needs even sides, so an
    odd width or height loses its last pixel column or row."""
    import av

    if not frames:
        raise ValueError("a video needs at least one frame")
    width, height = frames[0].width // 2 * 2, frames[0].height // 2 * 2
    if width < 2 or height < 2:
        raise ValueError(f"frames of {frames[0].width}x{frames[0].height} are too small for H.264")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            image = frame.convert("RGB")
            if image.size != (width, height):
                image = image.crop((0, 0, width, height))
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return buf.getvalue()


def output_format(path: str | Path) -> str:
    """The format a file name asks for: png | jpeg | webp | mp4 (ValueError for anything else)."""
    ext = Path(path).suffix.lower().lstrip(".")
    ext = "jpeg" if ext == "jpg" else ext
    if ext not in IMAGE_FORMATS and ext not in VIDEO_FORMATS:
        raise ValueError(f"cannot tell the output format from {str(path)!r}: use .png, .jpg, .webp or .mp4")
    return ext


def output_paths(path: str | Path, count: int) -> list[Path]:
    """One output: the path itself. Several: out.png -> out-0.png, out-1.png, ..."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def save_result(result, path: str | Path) -> list[Path]:
    """Write a GenerationResult's images or videos to `path` (format from the extension); returns the files."""
    fmt = output_format(path)
    if result.videos:
        if fmt not in VIDEO_FORMATS:
            raise ValueError(f"this model makes videos: write them to a .mp4 file, not {Path(path).name}")
        blobs = [encode_video(v, result.fps or 16) for v in result.videos]
    else:
        if fmt not in IMAGE_FORMATS:
            raise ValueError(
                f"this model makes images: write them to .png, .jpg or .webp, not {Path(path).name}"
            )
        blobs = [encode_image(im, fmt) for im in result.images]
    paths = output_paths(path, len(blobs))
    for p, blob in zip(paths, blobs, strict=True):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    return paths
