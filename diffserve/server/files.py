"""The output directory. Every file name is made here from random ids or validated job ids: no path is ever
built from user input, and names handed back by clients are checked against the exact pattern first."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

IMAGE_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_IMAGE_NAME = re.compile(r"[0-9a-f]{32}\.(png|jpeg|webp)")
VIDEO_ID = re.compile(r"video_[0-9a-f]{32}")


def write_atomic(path: Path, data: bytes) -> None:
    """Readers (and a restarted server) see the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class OutputFiles:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.videos = self.root / "videos"
        self.images.mkdir(parents=True, exist_ok=True)
        self.videos.mkdir(parents=True, exist_ok=True)

    def save_image(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_hex(16)}.{fmt}"
        write_atomic(self.images / name, data)
        return name

    def image_path(self, name: str) -> Path | None:
        if not _IMAGE_NAME.fullmatch(name):
            return None
        path = self.images / name
        return path if path.is_file() else None

    def video_path(self, video_id: str) -> Path:
        if not VIDEO_ID.fullmatch(video_id):
            raise ValueError("not a video id")
        return self.videos / f"{video_id}.mp4"

    def remove_video(self, video_id: str) -> None:
        self.video_path(video_id).unlink(missing_ok=True)

    def expire_images(self, ttl: float) -> int:
        """Delete images older than ttl seconds (URLs are meant to be fetched soon, as OpenAI's expire)."""
        cutoff, removed = time.time() - ttl, 0
        for entry in os.scandir(self.images):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
