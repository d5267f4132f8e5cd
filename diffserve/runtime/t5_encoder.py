"""A T5 / UMT5 encoder forward over a transformers encoder's own weights (FLUX's T5-XXL, Wan's UMT5-XXL),
with fewer, larger kernels than the module's forward:

  * q|k|v of each layer as one GEMM, and the gated feed-forward's wi_0|wi_1 as one GEMM: at 512 tokens
    the separate 4,096-wide projections fill a fraction of an H100's SMs;
  * each residual add with the RMSNorm after it, and the GELU gate, as one pass each (kernels.t5_ops),
    where the module's forward runs ~5 and ~9 elementwise torch ops;
  * T5's relative-position bias (shared by its layers) made into SDPA's dense mask once per forward.

fuse_t5(model) fuses the weights in place (models.base.fuse_linears, as the DiTs do): the concatenated
q|k|v and wi_0|wi_1 tensors replace the separate ones, whose parameters become views of them, so the
module keeps working (and loading: load_state_dict copies into the views) and no weight is held twice.
Fuse once the encoder is on its device and in its dtype: a later move to another device still gives the
same states (the weights are read from the module at every call), but breaks the sharing (memory
doubles). The states are the module's: the same ops in the same order, each rounded as the module rounds
it (tests/unit/test_t5_encoder.py compares them with transformers' forward).

Covered: T5EncoderModel and UMT5EncoderModel with the gated "gelu_new" feed-forward (T5 v1.1, UMT5), all
weights in bfloat16 or float32, no hooks. Anything else (float16, whose T5 forward clamps activations;
offloading hooks; other activations) is left to the module: fuse_t5 returns None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.t5_ops import gelu_gate, rms_norm
from diffserve.runtime.layers.text_attention import additive_mask
from diffserve.runtime.models.base import fuse_linears, has_hooks


def why_not_fused(model) -> str | None:
    """Why fuse_t5 leaves this encoder to its module's forward, or None."""
    name = type(model).__name__
    if name not in ("T5EncoderModel", "UMT5EncoderModel"):
        return f"{name} is not a T5/UMT5 encoder"
    config = model.config
    if not getattr(config, "is_gated_act", False) or getattr(config, "dense_act_fn", None) != "gelu_new":
        return "not the gated gelu_new feed-forward of T5 v1.1 / UMT5"
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or dtypes.pop() not in (torch.bfloat16, torch.float32):
        return "weights are not all bfloat16 or all float32"
    if any(has_hooks(m) for m in model.modules()):
        return "the module has hooks (offloading, adapters)"
    if model.training:
        return "training mode (dropout)"
    return None


class FusedT5Encoder:
    """Callable like the pipelines call a text encoder: (input_ids, attention_mask=None) -> last hidden
    states (batch, seq, d_model)."""

    def __init__(self, model):
        self.model = model
        stack = model.encoder
        self.embed, self.final_norm = stack.embed_tokens, stack.final_layer_norm
        # (self-attention sub-layer, feed-forward sub-layer) per block; their weights are read at every call,
        # so a later .to() of the module (which replaces its buffers) is followed.
        self.layers = [(block.layer[0], block.layer[1]) for block in stack.block]
        for attn, ff in self.layers:
            sa, dense = attn.SelfAttention, ff.DenseReluDense
            for lin in (sa.q, sa.k, sa.v, sa.o, dense.wi_0, dense.wi_1, dense.wo):
                if lin.bias is not None:
                    raise ValueError("T5 projections have no bias")
            fuse_linears(sa, ("q", "k", "v"), "qkv")  # buffer sa.qkv_weight (sa.qkv_bias: None)
            fuse_linears(dense, ("wi_0", "wi_1"), "wi")  # buffer dense.wi_weight
        self.heads, self.head_dim = stack.block[0].layer[0].SelfAttention.n_heads, model.config.d_kv
        self.d_ff = model.config.d_ff
        # T5 shares layer 0's position bias with every layer; UMT5 has a bias table per layer.
        self.bias_per_layer = all(
            attn.SelfAttention.has_relative_attention_bias for attn, _ in self.layers[1:]
        )

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length = input_ids.shape
        x = self.embed(input_ids)
        # Padded keys get the dtype's minimum, as transformers' masks do (additive_mask, as in our attention
        # function for the module's forward).
        keep = None if attention_mask is None else attention_mask.to(torch.bool)[:, None, None, :]
        padding = additive_mask(keep, None, x.dtype)
        first = self.layers[0][0].SelfAttention
        mask = None
        pending = None  # the previous sub-layer's output, added to the stream in the next norm's pass
        for attn, ff in self.layers:
            sa, dense = attn.SelfAttention, ff.DenseReluDense
            if mask is None or self.bias_per_layer:
                # (1, heads, length, length), by the layer's own bucketing and table.
                bias = (sa if self.bias_per_layer else first).compute_bias(length, length, x.device)
                # Dense and in the activation dtype: SDPA keeps its fused kernels only for a dense mask.
                mask = additive_mask(padding, bias, x.dtype).to(x.dtype).contiguous()
            x, h = rms_norm(x, pending, attn.layer_norm.weight, attn.layer_norm.variance_epsilon)
            qkv = F.linear(h, sa.qkv_weight).view(batch, length, 3, self.heads, self.head_dim)
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
            scale = float(getattr(sa, "scaling", 1.0))  # T5 does not scale its logits: 1.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out = F.linear(out.transpose(1, 2).reshape(batch, length, -1), sa.o.weight)
            x, h = rms_norm(x, out, ff.layer_norm.weight, ff.layer_norm.variance_epsilon)
            pending = F.linear(gelu_gate(F.linear(h, dense.wi_weight), self.d_ff), dense.wo.weight)
        return rms_norm(x, pending, self.final_norm.weight, self.final_norm.variance_epsilon)[1]


def fuse_t5(model) -> FusedT5Encoder | None:
    """The fused forward for a transformers T5/UMT5 encoder, or None where it does not apply (why_not_fused)."""
    if why_not_fused(model) is not None:
        return None
    return FusedT5Encoder(model)
