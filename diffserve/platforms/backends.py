"""The attention backends' names and how user input maps to them. No torch here: the server process and
the command line validate `--attention-backend` before any model (or torch) loads."""

from __future__ import annotations

import enum


class AttentionBackendEnum(str, enum.Enum):
    FA3 = "fa3"
    FA2 = "fa2"
    TORCH_SDPA = "torch_sdpa"

    @classmethod
    def parse(cls, value: str | AttentionBackendEnum | None) -> AttentionBackendEnum | None:
        """User input ('fa3', 'FA3', 'flash_attention_3', 'sdpa', 'auto', None) -> a member, or None for auto."""
        if value is None or isinstance(value, cls):
            return value
        key = value.strip().lower().replace("-", "_")
        if key in ("", "auto", "default"):
            return None
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(
                f"unknown attention backend {value!r} (choose one of: auto, {choices})"
            ) from None


_ALIASES = {
    "flash_attention_3": "fa3",
    "flash_attn_3": "fa3",
    "flash3": "fa3",
    "flash_attention_2": "fa2",
    "flash_attn_2": "fa2",
    "flash_attn": "fa2",
    "flash2": "fa2",
    "sdpa": "torch_sdpa",
    "torch": "torch_sdpa",
}
