"""The encode-text stage: prompts -> token ids (padded to the length the encoders were trained on) -> the
encoder output a pipeline conditions on, through CUDA graphs on a GPU (TextEncoder)."""

from __future__ import annotations

import html
import re

import torch

from diffserve.runtime import cuda_graphs
from diffserve.runtime.pipelines.stages import upload
from diffserve.runtime.t5_encoder import fuse_t5


def clean_prompt(text: str) -> str:
    """Wan's prompt normalisation (ftfy when installed, HTML entities, collapsed whitespace)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to exactly max_length (the encoders were trained on fixed-length padded prompts)."""
    out = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out.input_ids, out.attention_mask


def encoder_device(encoder) -> torch.device:
    return next(encoder.parameters()).device


class TextEncoder(cuda_graphs.GraphedForward):
    """A text encoder as the pipelines call it: padded token ids (and the padding mask, for encoders that
    take one) in, the one output a pipeline reads (`output`: "pooler_output" or "last_hidden_state") out.

    On a GPU the forward replays as a CUDA graph: prompts are padded to a fixed length, so every call has
    the same shapes, and T5-XXL's forward is ~1,000 short kernels (24 layers of small ops around 512-row
    GEMMs) that keep the GPU waiting on the host between launches; one graph replay removes those gaps
    (benchmarks/RESULTS.md, session 3: the text stage of a FLUX generation). Elsewhere: the plain call."""

    def __init__(self, module, output: str):
        self.module, self.output = module, output
        # T5/UMT5 last hidden states come from our fused forward over the module's weights (t5_encoder.py:
        # fewer, larger kernels, the same states); None for CLIP and anything it does not cover.
        self.fused = fuse_t5(module) if output == "last_hidden_state" else None
        super().__init__(self._forward, max_graphs=2)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(input_ids, attention_mask)
        out = self.module(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=False)
        return getattr(out, self.output)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The output for these ids, on the encoder's device and in its dtype."""
        from diffserve.runtime import offload

        offload.onload(self.module)  # --offload: the fused T5 reads weights without calling the module
        device = encoder_device(self.module)
        inputs = {"input_ids": upload(ids, device)}
        if mask is not None:
            inputs["attention_mask"] = upload(mask, device)
        return self(**inputs).to(self.module.dtype)


def clip_pooled(tokenizer, encoder: TextEncoder, prompts: list[str]) -> torch.Tensor:
    """CLIP's pooled output (the end-of-text token's state), as FLUX conditions on it."""
    ids, _ = tokenize(tokenizer, prompts, tokenizer.model_max_length)
    return encoder.encode(ids)


def t5_states(
    tokenizer, encoder: TextEncoder, prompts: list[str], max_length: int, zero_padding: bool = False
):
    """T5/UMT5 last hidden states, (batch, max_length, dim). FLUX runs T5 without a mask over the padding;
    Wan passes the mask and zeroes the padded positions (zero_padding=True)."""
    ids, mask = tokenize(tokenizer, prompts, max_length)
    if not zero_padding:
        return encoder.encode(ids)
    states = encoder.encode(ids, mask)
    return states.masked_fill(~mask.to(states.device).bool()[..., None], 0.0)
