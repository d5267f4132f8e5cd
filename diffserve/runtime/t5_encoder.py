"""A T5 / UMT5 encoder forward over a transformers encoder's own weights (FLUX's T5-XXL, Wan's UMT5-XXL),
with fewer, larger kernels than the module's forward:

  * q|k|v of each layer as one GEMM, and the gated feed-forward's wi_0|wi_1 as one GEMM: at 512 tokens
    the separate 4,096-wide projections fill a fraction of an H100's SMs;
  * each residual add with the RMSNorm after it, and the GELU gate, as one pass each (kernels.t5_ops),
    where the module's forward runs ~5 and ~9 elementwise torch ops;
  * T5's relative-position bias (shared by its layers) made into SDPA's dense mask once per forward.

fuse_t5(model) fuses the weights in place: the concatenated q|k|v and wi_0|wi_1 tensors replace the
separate ones, whose parameters become views of them, so the module keeps working (and loading:
load_state_dict copies into the views) and no weight is held twice. Fuse where the encoder will run:
moving the module afterwards (model.to) gives it new parameters and leaves the fused tensors behind (fuse
it again then). The states are the module's: the same ops in the same order, each rounded as the module
rounds it (tests/unit/test_t5_encoder.py compares them with transformers' forward).

Covered: T5EncoderModel and UMT5EncoderModel with the gated "gelu_new" feed-forward (T5 v1.1, UMT5), all
weights in bfloat16 or float32, no hooks. Anything else (float16, whose T5 forward clamps activations;
offloading hooks; other activations) is left to the module: fuse_t5 returns None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.t5_ops import gelu_gate, rms_norm


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
    if any(
        getattr(m, "_hf_hook", None) is not None or m._forward_hooks or m._forward_pre_hooks
        for m in model.modules()
    ):
        return "the module has hooks (offloading, adapters)"
    if model.training:
        return "training mode (dropout)"
    return None


def _fuse_linears(linears) -> torch.Tensor:
    """One (sum of out_features, in_features) weight for bias-free linears that read the same input; each
    linear's weight becomes a view of its rows."""
    fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = torch.nn.Parameter(fused[row : row + n], requires_grad=False)
        row += n
    return fused


class FusedT5Encoder:
    """Callable like the pipelines call a text encoder: (input_ids, attention_mask=None) -> last hidden
    states (batch, seq, d_model)."""

    def __init__(self, model):
        self.model = model
        stack = model.encoder
        self.embed, self.final_norm = stack.embed_tokens, stack.final_layer_norm
        self.layers = []
        for block in stack.block:
            attn, ff = block.layer[0], block.layer[1]
            sa, dense = attn.SelfAttention, ff.DenseReluDense
            for lin in (sa.q, sa.k, sa.v, sa.o, dense.wi_0, dense.wi_1, dense.wo):
                if lin.bias is not None:
                    raise ValueError("T5 projections have no bias")
            self.layers.append(
                dict(
                    attn=sa,
                    norm1=attn.layer_norm,
                    qkv=_fuse_linears((sa.q, sa.k, sa.v)),
                    o=sa.o.weight,
                    scale=float(getattr(sa, "scaling", 1.0)),  # T5 does not scale its logits: 1.0
                    norm2=ff.layer_norm,
                    wi=_fuse_linears((dense.wi_0, dense.wi_1)),
                    wo=dense.wo.weight,
                )
            )
        self.heads, self.head_dim = stack.block[0].layer[0].SelfAttention.n_heads, model.config.d_kv
        self.d_ff = model.config.d_ff
        # T5 shares layer 0's position bias with every layer; UMT5 has a bias table per layer.
        self.bias_per_layer = all(layer["attn"].has_relative_attention_bias for layer in self.layers[1:])

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length = input_ids.shape
        x = self.embed(input_ids)
        padding = None
        if attention_mask is not None:  # padded keys get the dtype's minimum, as transformers' masks do
            keep = attention_mask.to(torch.bool)[:, None, None, :]
            padding = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~keep, torch.finfo(x.dtype).min
            )
        mask = None
        pending = None  # the previous sub-layer's output, added to the stream in the next norm's pass
        for layer in self.layers:
            if mask is None or self.bias_per_layer:
                # (1, heads, length, length), by the layer's own bucketing and table.
                bias = (layer if self.bias_per_layer else self.layers[0])["attn"].compute_bias(
                    length, length, x.device
                )
                # Dense and in the activation dtype: SDPA keeps its fused kernels only for a dense mask.
                mask = (bias if padding is None else bias + padding).to(x.dtype).contiguous()
            x, h = rms_norm(x, pending, layer["norm1"].weight, layer["norm1"].variance_epsilon)
            qkv = F.linear(h, layer["qkv"]).view(batch, length, 3, self.heads, self.head_dim)
            q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer["scale"])
            out = F.linear(out.transpose(1, 2).reshape(batch, length, -1), layer["o"])
            x, h = rms_norm(x, out, layer["norm2"].weight, layer["norm2"].variance_epsilon)
            pending = F.linear(gelu_gate(F.linear(h, layer["wi"]), self.d_ff), layer["wo"])
        return rms_norm(x, pending, self.final_norm.weight, self.final_norm.variance_epsilon)[1]


def fuse_t5(model) -> FusedT5Encoder | None:
    """The fused forward for a transformers T5/UMT5 encoder, or None where it does not apply (why_not_fused)."""
    if why_not_fused(model) is not None:
        return None
    return FusedT5Encoder(model)
