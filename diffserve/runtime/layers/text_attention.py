"""Our attention backend inside transformers' text encoders (CLIP, T5, UMT5). Placeholder until the
platform selection lands: it leaves the model as loaded."""

from __future__ import annotations


def apply_to_text_encoder(model, attention_backend: str | None = None):
    return model
