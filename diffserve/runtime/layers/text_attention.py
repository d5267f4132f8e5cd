"""Our attention backend inside transformers' text encoders (CLIP, T5, UMT5).

transformers dispatches attention through a registry (`AttentionInterface`) keyed by
`config._attn_implementation`. We register one function under "diffserve" and point the encoder at it, so
the text-encoder warmup request runs the same platform-selected backend as the DiT blocks.

What flash kernels cannot take: an additive bias (T5's relative position bias) or a padding mask. Those
calls go to SDPA with the bias folded into its mask, which computes the same function; calls with neither
(CLIP's causal self-attention, unpadded prompts) go to the selected backend.
"""

from __future__ import annotations

import weakref

import torch

from diffserve.runtime.layers.attention import get_attention_backend, set_attention_backend

IMPLEMENTATION = "diffserve"


def additive_mask(
    attention_mask: torch.Tensor | None, position_bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """What SDPA adds to the logits: position_bias + attention_mask, a boolean mask (True: attend) first
    turned into 0 / dtype's minimum; either may be None (both None: None)."""
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(
            attention_mask.shape, dtype=dtype, device=attention_mask.device
        ).masked_fill(~attention_mask, torch.finfo(dtype).min)
    if position_bias is None:
        return attention_mask
    return position_bias if attention_mask is None else position_bias + attention_mask


# The last dense mask built, keyed by the identity of the tensors it came from: T5 computes its position bias
# in the first layer and hands the same tensor (and the same padding mask) to all 24, so the dense copy is
# made once per forward instead of once per layer (the per-layer copies were 4.4 of 16.7 ms of a T5-XXL
# forward on an H100). UMT5 has a bias per layer: every layer misses, as before. Only masks with a position
# bias are kept (it is a new tensor every forward, so nothing is reused across forwards).
_last_dense: tuple = ()


def _version(t: torch.Tensor) -> int | None:
    # Inference tensors (the pipelines run under inference_mode) keep no version counter.
    return None if t.is_inference() else t._version


def _ref(t: torch.Tensor | None):
    """Who t is and which version of its values: a weak reference (the cache must not keep it alive) and
    its in-place-modification counter where it has one."""
    return None if t is None else (weakref.ref(t), _version(t))


def _same(ref, t: torch.Tensor | None) -> bool:
    return ref is None if t is None else (ref is not None and ref[0]() is t and ref[1] == _version(t))


def _dense_mask(attention_mask, position_bias, causal: bool, query, key) -> torch.Tensor | None:
    """The additive float mask SDPA gets: bias + padding mask (+ causality), dense and in q's dtype."""
    global _last_dense
    shape = (query.dtype, causal, query.shape[2], key.shape[2])
    if _last_dense and _last_dense[2] == shape:
        bias_ref, mask_ref, _, dense = _last_dense
        if _same(bias_ref, position_bias) and _same(mask_ref, attention_mask):
            return dense
    mask = additive_mask(attention_mask, position_bias, query.dtype)
    if mask is None:
        return None
    if causal:  # a mask and causality together: fold causality into the mask
        q_len, k_len = query.shape[2], key.shape[2]
        upper = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
        mask = mask.masked_fill(upper, torch.finfo(mask.dtype).min)
    # Dense: T5 hands its relative-position bias over as a transposed view, and with a strided mask SDPA
    # leaves its fused kernels (cuDNN, memory-efficient) for the float32 math path, several times slower on
    # an H100 (benchmarks/RESULTS.md, session 3).
    dense = mask.to(query.dtype).contiguous()
    if position_bias is not None:
        _last_dense = (_ref(position_bias), _ref(attention_mask), shape, dense)
    return dense


def diffserve_text_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q/k/v (batch, heads, seq, dim) -> ((batch, seq, heads, dim),
    None)."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    causal = causal and query.shape[2] > 1
    mask = _dense_mask(attention_mask, position_bias, causal, query, key)
    if mask is None:
        backend = get_attention_backend(query.shape[-1], query.dtype, query.device.type)
        out = backend.forward(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scaling, causal=causal
        )
        return out, None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


def _square_self_attention(kwargs: dict) -> bool:
    """Whether a mask request is for queries and keys over the same positions from 0 (encoders; no cache).
    Handles both spellings transformers has used (q_length or cache_position)."""
    if "q_length" in kwargs:
        q_len = kwargs["q_length"]
    elif kwargs.get("cache_position") is not None:
        q_len = kwargs["cache_position"].shape[0]
    else:
        return False
    offsets = (kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0))
    return all(isinstance(o, int) and o == 0 for o in offsets) and q_len == kwargs.get("kv_length")


def register_text_encoder_attention() -> str:
    """Register our function (and SDPA-style masks) with transformers; returns the implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

    def mask(*args, **kwargs):
        """sdpa_mask, except that an unpadded causal self-attention mask is always skipped (None: attention
        runs causal), also while a CUDA graph is captured. transformers treats a capture as tracing and then
        builds the dense causal mask it skips eagerly, so the captured forward took another path (SDPA with
        a mask) than its eager warm-up, whose first run inside the capture failed (cuDNN allocating): CLIP
        could not run as a graph."""
        if (
            not args
            and kwargs.get("allow_is_causal_skip", True)
            and all(kwargs.get(key) is None for key in ("attention_mask", "padding_mask"))  # no padding
            and kwargs.get("local_size") is None
            and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
            and _square_self_attention(kwargs)
        ):
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(IMPLEMENTATION, diffserve_text_attention)
    # Without a mask function transformers would drop padding masks for a custom implementation.
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, mask)
    return IMPLEMENTATION


def apply_to_text_encoder(model, attention_backend: str | None = None):
    """Make a loaded transformers text encoder use our backend. `attention_backend` (if given) sets the
    process-wide choice, as --attention-backend does."""
    if attention_backend is not None:
        set_attention_backend(attention_backend)
    model.set_attn_implementation(register_text_encoder_attention())
    return model
