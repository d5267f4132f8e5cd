"""FLUX.1 transformer (dev with guidance embedding, schnell without): 19 dual-stream blocks, where text and
image tokens keep separate weights but attend jointly, then 38 single-stream blocks over the concatenated
sequence. Parameter names match diffusers' FluxTransformer2DModel, so its checkpoints load unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.runtime.distributed.ulysses import UNSHARDED, sequence_parallel_attention, shard_sequence
from diffserve.runtime.layers.attention import attention
from diffserve.runtime.layers.embeddings import MLPEmbedder, timestep_sinusoid
from diffserve.runtime.layers.fp8 import (
    Fp8Linear,
    Quantized,
    concat_gelu_quant,
    fp8_layers,
    norm_modulate_quant,
    residual_norm_modulate_quant,
)
from diffserve.runtime.layers.lora import downs_together, input_buffer
from diffserve.runtime.layers.mlp import FeedForward, feed_forwards, layer_gelu, linear_concat
from diffserve.runtime.layers.modulation import (
    AdaLNProjection,
    clip_fp16,
    gated_residual,
    norm_modulate,
    residual_norm_modulate,
)
from diffserve.runtime.layers.rope import axes_rope, norm_rope
from diffserve.runtime.models.base import DiTConfig, NativeDiT, fuse_linears
from diffserve.runtime.step_cache import unpadded_rows

_EPS = 1e-6
_TIME_FREQ_DIM = 256


@dataclasses.dataclass
class FluxConfig(DiTConfig):
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class FluxAttention(nn.Module):
    """Joint attention. Dual-stream blocks have the text-side projections (add_*) and output projections;
    single-stream blocks project the joint sequence once and have no output projection (pre_only).

    After fuse_projections() q|k|v of each stream come from one GEMM (`qkv_weight`, `add_qkv_weight`); after
    layers.fp8.quantize_linears a quantised stream's fused GEMM is the Fp8Linear `qkv` (`add_qkv`), whose
    input may arrive quantised (a Quantized from the block's adaLN pass)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dual: bool):
        super().__init__()
        self.head_dim = head_dim
        self.inner = inner = heads * head_dim
        self.dual = dual
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q = nn.RMSNorm(head_dim, eps=_EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=_EPS)
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        self.fp8_attention = False  # attention in FP8 (layers/attention.use_fp8_attention)
        if dual:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q = nn.RMSNorm(head_dim, eps=_EPS)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=_EPS)
            # to_out.1 was dropout in diffusers; Identity keeps the index (and the state-dict names).
            self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])
            self.to_add_out = nn.Linear(inner, dim)
            self.register_buffer("add_qkv_weight", None, persistent=False)
            self.register_buffer("add_qkv_bias", None, persistent=False)

    def fuse_projections(self) -> None:
        fuse_linears(self, ("to_q", "to_k", "to_v"), "qkv")
        if self.dual:
            fuse_linears(self, ("add_q_proj", "add_k_proj", "add_v_proj"), "add_qkv")

    def stream_fp8(self, prefix: str = "") -> bool:
        """Whether the stream's q, k and v projections are all FP8 (then its input is worth quantising once,
        in the pass that writes it)."""
        if prefix:
            return fp8_layers(self.add_q_proj, self.add_k_proj, self.add_v_proj)
        return fp8_layers(self.to_q, self.to_k, self.to_v)

    def _fp8_qkv(self, prefix: str) -> Fp8Linear | None:
        layer = getattr(self, f"{prefix}qkv", None)
        return layer if isinstance(layer, Fp8Linear) else None

    def _stream(self, x: torch.Tensor | Quantized, prefix: str, rope):
        """One stream's q, k, v (batch, seq, heads, head_dim): RMS-normed, q/k rotated by its rope rows."""
        fused = getattr(self, f"{prefix}qkv_weight")
        if fused is not None:
            qkv = F.linear(x, fused, getattr(self, f"{prefix}qkv_bias")).split(self.inner, dim=-1)
        elif self._fp8_qkv(prefix) is not None:
            qkv = self._fp8_qkv(prefix)(x).split(self.inner, dim=-1)
        elif prefix:
            qkv = self.add_q_proj(x), self.add_k_proj(x), self.add_v_proj(x)
        else:
            qkv = self.to_q(x), self.to_k(x), self.to_v(x)
        norm_q, norm_k = (self.norm_added_q, self.norm_added_k) if prefix else (self.norm_q, self.norm_k)
        q, k, v = qkv
        return (
            norm_rope(q, norm_q, rope, self.head_dim),
            norm_rope(k, norm_k, rope, self.head_dim),
            v.unflatten(-1, (-1, self.head_dim)),
        )

    def _joint_ready(self) -> bool:
        """Whether both streams' q|k|v are one GEMM each (bf16 fused weights or a fused Fp8Linear)."""
        return all(
            getattr(self, f"{prefix}qkv_weight") is not None or self._fp8_qkv(prefix) is not None
            for prefix in ("", "add_")
        )

    def _project_rows(self, prefix: str, x: torch.Tensor | Quantized, out: torch.Tensor) -> None:
        """A stream's fused q|k|v projection of batch-1 x written into `out` (its rows of the joint buffer)."""
        fp8 = self._fp8_qkv(prefix)
        if fp8 is not None:
            fp8(x, out_dtype=out.dtype, out=out)
        else:
            torch.addmm(
                getattr(self, f"{prefix}qkv_bias"), x[0], getattr(self, f"{prefix}qkv_weight").t(), out=out
            )

    def _joint_qkv(self, x: torch.Tensor | Quantized, context: torch.Tensor | Quantized, rope, dtype):
        """Dual-block q, k, v of [text | image] for batch 1 without concatenating: both streams' fused
        projections write their rows of one (tokens, q|k|v) buffer, q and k are normalised and rotated in
        place, and attention reads q, k, v as strided views of it (saves three copies of the joint
        sequence per block: ~3 ms per FLUX.1 forward at 1024^2). An FP8 stream's GEMM writes its rows too."""
        n_txt, inner, head_dim = _tokens(context), self.inner, self.head_dim
        buf = torch.empty(n_txt + _tokens(x), 3 * inner, dtype=dtype, device=_device(x))
        self._project_rows("add_", context, buf[:n_txt])
        self._project_rows("", x, buf[n_txt:])
        buf = buf[None]
        cos, sin = rope
        streams = (
            (slice(None, n_txt), self.norm_added_q, self.norm_added_k),
            (slice(n_txt, None), self.norm_q, self.norm_k),
        )
        for rows, norm_q, norm_k in streams:
            stream_rope = (cos[rows], sin[rows])
            norm_rope(buf[:, rows, :inner], norm_q, stream_rope, head_dim, inplace=True)
            norm_rope(buf[:, rows, inner : 2 * inner], norm_k, stream_rope, head_dim, inplace=True)
        return tuple(buf[..., i * inner : (i + 1) * inner].unflatten(-1, (-1, head_dim)) for i in range(3))

    def forward(
        self,
        x: torch.Tensor | Quantized,
        rope: tuple[torch.Tensor, torch.Tensor],
        context: torch.Tensor | Quantized | None = None,
        queries_from: int = 0,
        dtype: torch.dtype | None = None,
    ):
        """queries_from (single-stream, unsharded): attend only from the tokens at and after this index
        (every token still serves as a key and value); the output has only their rows. x and context may be
        Quantized (FP8 projections); dtype: the activation dtype (needed when both are)."""
        if context is None:
            q, k, v = self._stream(x, "", rope)
            if queries_from:
                return attention(q[:, queries_from:], k, v, fp8=self.fp8_attention).flatten(2)
        elif _batch(x) == 1 and self._joint_ready():
            n_txt = _tokens(context)
            q, k, v = self._joint_qkv(x, context, rope, dtype or _dtype(x, context))
        else:
            # Text tokens come first in the joint sequence, matching the order of the rope ids.
            n_txt = _tokens(context)
            cos, sin = rope
            cq, ck, cv = self._stream(context, "add_", (cos[:n_txt], sin[:n_txt]))
            q, k, v = self._stream(x, "", (cos[n_txt:], sin[n_txt:]))
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        # = attention() unless sequence-parallel
        out = sequence_parallel_attention(q, k, v, fp8=self.fp8_attention).flatten(2)
        if context is None:
            return out
        img = _out_rows(self.to_out[0], out[:, n_txt:])
        txt = _out_rows(self.to_add_out, out[:, :n_txt])
        downs_together([(self.to_out[0], img), (self.to_add_out, txt)])  # LoRA: one launch for both
        return self.to_out[0](img), self.to_add_out(txt)


def _out_rows(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    # contiguous(): with batch > 1 the slices are strided, and strided GEMM inputs take a slower (and on
    # the CPU, less accurate) path. A no-op for batch 1. An FP8 layer's quantisation pass reads strided rows
    # and writes the GEMM's contiguous input itself.
    return rows if isinstance(layer, Fp8Linear) else rows.contiguous()


def _batch(x: torch.Tensor | Quantized) -> int:
    return (x.q if isinstance(x, Quantized) else x).shape[0]


def _tokens(x: torch.Tensor | Quantized) -> int:
    return (x.q if isinstance(x, Quantized) else x).shape[1]


def _device(x: torch.Tensor | Quantized) -> torch.device:
    return (x.q if isinstance(x, Quantized) else x).device


def _dtype(*xs: torch.Tensor | Quantized) -> torch.dtype:
    """The activation dtype: that of the first input not quantised."""
    dtype = next((x.dtype for x in xs if not isinstance(x, Quantized)), None)
    if dtype is None:
        raise ValueError("both streams are quantised: pass the activation dtype")
    return dtype


def _enter(
    x: torch.Tensor, pending, shift: torch.Tensor, scale: torch.Tensor, quantize: bool = False, out=None
):
    """(x, modulated input of the block): the previous block's deferred gated residual (pending = (y, gate),
    or None) is added in the same pass that normalises and modulates. Deferring saves one write and one read
    of the residual stream per block boundary (FLUX.1 at 1024^2 on an H100: our kernels 6.3 -> 5.5 ms per
    forward). quantize: the modulated input written as a Quantized (its GEMMs are FP8) in that same pass;
    else out: where it goes (a LoRA layer's wide input buffer, layers/lora.input_buffer)."""
    if quantize:
        if pending is None:
            return x, norm_modulate_quant(x, shift, scale, _EPS)
        return residual_norm_modulate_quant(x, pending[0], pending[1], shift, scale, _EPS)
    if pending is None:
        return x, norm_modulate(x, shift, scale, _EPS, out=out)
    return residual_norm_modulate(x, pending[0], pending[1], shift, scale, _EPS, out=out)


class FluxDualBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLNProjection(dim, 6)
        self.norm1_context = AdaLNProjection(dim, 6)
        self.attn = FluxAttention(dim, heads, head_dim, dual=True)
        self.ff = FeedForward(dim, 4 * dim)
        self.ff_context = FeedForward(dim, 4 * dim)

    def forward(
        self, img, txt, cond, rope, projected=(None, None), pending=(None, None), defer: bool = False
    ):
        """projected: (image, text) adaLN projections of cond when already computed (FluxTransformer).
        pending: the previous block's deferred MLP residuals, (y, gate) per stream or None; defer: return
        (img, txt, pending) with this block's own MLP residuals left for the next block to add, instead of
        (img, txt)."""
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = self.norm1(cond, projected[0])
        c_shift, c_scale, c_gate, c_mlp_shift, c_mlp_scale, c_mlp_gate = self.norm1_context(
            cond, projected[1]
        )
        # With FP8 projections (layers/fp8.py) each stream's GEMM inputs are written quantised by the adaLN
        # pass that computes them; the default selection quantises the image stream only.
        # With LoRA adapters (layers/lora.py) the adaLN passes write into the wide input buffers of the
        # layers they feed, whose K-append GEMMs then need no join.
        img, img_in = _enter(
            img,
            pending[0],
            shift,
            scale,
            self.attn.stream_fp8(),
            input_buffer([self.attn._fp8_qkv("")], img),
        )
        txt, txt_in = _enter(
            txt, pending[1], c_shift, c_scale, self.attn.stream_fp8("add_"),
            input_buffer([self.attn._fp8_qkv("add_")], txt),
        )  # fmt: skip
        img_attn, txt_attn = self.attn(img_in, rope, context=txt_in, dtype=img.dtype)
        img, h = self._mlp_input(self.ff, img, img_attn, gate, mlp_shift, mlp_scale)
        txt, c_h = self._mlp_input(self.ff_context, txt, txt_attn, c_gate, c_mlp_shift, c_mlp_scale)
        # the two MLPs in stages, their LoRA down-projections paired (layers/mlp.feed_forwards)
        img_mlp, txt_mlp = feed_forwards([(self.ff, h), (self.ff_context, c_h)])
        if defer:
            return img, txt, ((img_mlp, mlp_gate), (txt_mlp, c_mlp_gate))
        return gated_residual(img, img_mlp, mlp_gate), clip_fp16(gated_residual(txt, txt_mlp, c_mlp_gate))

    @staticmethod
    def _mlp_input(ff: FeedForward, x, attn, gate, shift, scale):
        """(x + attn * gate, the MLP's modulated input): quantised for an FP8 input projection, else
        written where a LoRA input projection wants it."""
        proj_in = ff.net[0].proj
        if fp8_layers(proj_in):
            return residual_norm_modulate_quant(x, attn, gate, shift, scale, _EPS)
        return residual_norm_modulate(x, attn, gate, shift, scale, _EPS, out=input_buffer([proj_in], x))


class FluxSingleBlock(nn.Module):
    """Attention and MLP in parallel from one modulated input; one output projection over both.

    The MLP's GELU runs in its GEMM's epilogue on CUDA, and the output projection of [attention | MLP]
    runs as two accumulating GEMMs instead of over a concatenated copy (layers.mlp.linear_concat)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = AdaLNProjection(dim, 3)
        self.attn = FluxAttention(dim, heads, head_dim, dual=False)
        self.proj_mlp = nn.Linear(dim, int(dim * mlp_ratio))
        self.proj_out = nn.Linear(dim + int(dim * mlp_ratio), dim)

    def lora_n_append(self) -> tuple[str, ...]:
        # proj_out's adapter as more output rows (layers/lora.py LoraLinear.n_append): its 15,360-wide input
        # is read once, where a down-projection would read it again. H200, a rank-32 adapter: 666.6 us
        # against 730.3 for K-append (the base: 641.7; benchmarks/lora_down_rates.py --n-append). So no
        # chain from proj_mlp (LoraLinear.chain): proj_out needs no low-rank columns in its input.
        return ("proj_out",)

    def lora_shared_inputs(self) -> tuple[tuple[str, ...], ...]:
        # the MLP input and q|k|v projections both read h: one wide buffer, one down-projection for both
        # (layers/lora.share_input; the MLP first: it has more output rows)
        return (("proj_mlp", "attn.qkv"),)

    def forward(self, x, cond, rope, projected=None, keep_from: int = 0, pending=None, defer: bool = False):
        """keep_from: return only the rows from this token on (the last block of the model, whose text rows
        are dropped anyway: their MLP, output projection and queries are skipped, ~0.17 ms of a FLUX.1
        forward at 1024^2 by FLOP count). Every token still provides keys and values, so the kept rows are
        unchanged. pending/defer: as FluxDualBlock's (one stream): with defer, returns (x, (y, gate))."""
        shift, scale, gate = self.norm(cond, projected)
        if fp8_layers(self.proj_mlp, self.proj_out) and self.attn.stream_fp8():
            # FP8: h written quantised once for q|k|v and the MLP; [attention | GELU(MLP)] quantised in one
            # pass (never concatenated, nor the GELU written, in bf16) for the output projection.
            x, h = _enter(x, pending, shift, scale, quantize=True)
            mlp = self.proj_mlp(h.tokens(keep_from))
            out = self.proj_out(concat_gelu_quant(self.attn(h, rope, queries_from=keep_from), mlp))
        else:
            # With LoRA: h written into the wide buffer that q|k|v and the MLP input projection share
            # (layers/lora.input_buffer, share_input), or that the one of them with an adapter reads. The
            # last block's MLP reads rows from keep_from on only: it joins them itself.
            layers = [self.attn._fp8_qkv("")] + ([self.proj_mlp] if not keep_from else [])
            x, h = _enter(x, pending, shift, scale, out=input_buffer(layers, x))
            mlp = layer_gelu(self.proj_mlp, h[:, keep_from:])
            out = linear_concat([self.attn(h, rope, queries_from=keep_from), mlp], self.proj_out)
        if defer:
            return x[:, keep_from:], (out, gate)
        return clip_fp16(gated_residual(x[:, keep_from:], out, gate))


class _TimeTextEmbed(nn.Module):
    """timestep (+ guidance) sinusoids through their MLPs, plus the pooled text projection."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(_TIME_FREQ_DIM, dim)
        if guidance:
            self.guidance_embedder = MLPEmbedder(_TIME_FREQ_DIM, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor):
        emb = self.timestep_embedder(timestep_sinusoid(timestep, _TIME_FREQ_DIM).to(pooled.dtype))
        if guidance is not None:
            emb = emb + self.guidance_embedder(timestep_sinusoid(guidance, _TIME_FREQ_DIM).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


class FluxTransformer(NativeDiT):
    config_class = FluxConfig

    def __init__(self, config: FluxConfig):
        super().__init__(config)
        c = config
        dim, heads, head_dim = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        self.time_text_embed = _TimeTextEmbed(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            FluxDualBlock(dim, heads, head_dim) for _ in range(c.num_layers)
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleBlock(dim, heads, head_dim) for _ in range(c.num_single_layers)
        )
        # Final adaLN: diffusers' AdaLayerNormContinuous, whose projection yields (scale, shift) in that order.
        self.norm_out = AdaLNProjection(dim, 2)
        out_channels = c.out_channels or c.in_channels
        self.proj_out = nn.Linear(dim, c.patch_size * c.patch_size * out_channels)
        self.register_buffer("adaln_weight", None, persistent=False)
        self.register_buffer("adaln_bias", None, persistent=False)

    def _adaln_layers(self) -> list[str]:
        """Every adaLN projection, in the order the forward consumes them."""
        names = []
        for i in range(len(self.transformer_blocks)):
            names += [f"transformer_blocks.{i}.norm1.linear", f"transformer_blocks.{i}.norm1_context.linear"]
        names += [
            f"single_transformer_blocks.{i}.norm.linear" for i in range(len(self.single_transformer_blocks))
        ]
        return [*names, "norm_out.linear"]

    def fuse_projections(self):
        """Also fuse all 77 adaLN projections (FLUX.1: 4.3 GB of weights, all reading silu(temb)) into one
        GEMV: at batch 1 they are pure weight reads, and one long read runs at HBM speed where 77 short
        ones reached 1.3-2.6 TB/s (~1.3 ms per forward)."""
        super().fuse_projections()
        layers = self._adaln_layers()
        fuse_linears(self, tuple(layers), "adaln")
        # Where each layer's rows sit in the fused output, taken once here instead of at every forward.
        self._adaln_sizes = [self.get_submodule(name).out_features for name in layers]
        return self

    def _projected_adaln(self, cond: torch.Tensor):
        """An iterator over each adaLN layer's projection of cond (one GEMV when fused), else of Nones."""
        if self.adaln_weight is None:
            return iter(lambda: None, 0)  # endless Nones: each layer projects for itself
        return iter(F.linear(cond, self.adaln_weight, self.adaln_bias).split(self._adaln_sizes, dim=-1))

    def _conditioning(self, timestep, guidance, pooled: torch.Tensor, batch: int, device) -> torch.Tensor:
        """silu(temb): what every adaLN projection reads. Rounding the timestep to the activation dtype
        before scaling follows the reference; the model was trained and distilled with it."""
        if self.config.guidance_embeds and guidance is None:
            raise ValueError("this FLUX transformer has a guidance embedding (dev); pass guidance")
        dtype = self.x_embedder.weight.dtype
        timestep = self._per_sample(timestep, batch, device).to(dtype) * 1000
        if self.config.guidance_embeds:
            guidance = self._per_sample(guidance, batch, device).to(dtype) * 1000
        else:
            guidance = None  # schnell has no guidance embedder; pipelines may pass one anyway
        return F.silu(self.time_text_embed(timestep, guidance, pooled))

    def adaln_schedule(
        self, timesteps: torch.Tensor, guidance: torch.Tensor | None, pooled_projections: torch.Tensor
    ) -> torch.Tensor | None:
        """Every adaLN projection of every step of a schedule, computed up front: (steps, batch, total),
        row i to be passed as forward(..., adaln=schedule[i]). None when the projections are not fused.

        Why: at batch 1 the 77 adaLN projections of FLUX.1 are a 6.4 GB weight read per forward (~2.3 ms on
        an H100, every step), while their input depends only on the timestep, the guidance and the pooled
        text, all known before the loop. One GEMM over all steps reads the weights once per generation.
        timesteps (steps,) in [0, 1] as forward takes them; guidance (batch,) or None; pooled (batch, dim).
        Each row is computed as forward computes it (same rounding of the inputs; the GEMM has more rows,
        which may change the last bit of a sum, well inside bf16 precision)."""
        if self.adaln_weight is None:
            return None
        steps, batch = timesteps.shape[0], pooled_projections.shape[0]
        device = pooled_projections.device
        per_step = timesteps.to(device).reshape(steps, 1).expand(steps, batch)
        if guidance is not None:
            guidance = self._per_sample(guidance, batch, device).reshape(1, batch).expand(steps, batch)
            guidance = guidance.reshape(-1)
        pooled = pooled_projections.unsqueeze(0).expand(steps, -1, -1).reshape(steps * batch, -1)
        cond = self._conditioning(per_step.reshape(-1), guidance, pooled, steps * batch, device)
        return F.linear(cond, self.adaln_weight, self.adaln_bias).view(steps, batch, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        return_dict: bool = True,
        adaln: torch.Tensor | None = None,
        **ignored,
    ):
        """hidden_states (batch, img_seq, in_channels) packed latents; encoder_hidden_states (batch,
        txt_seq, joint_attention_dim); timestep and guidance in [0, 1] per sample (scaled by 1000 here, as
        diffusers' pipelines expect); img_ids/txt_ids (seq, 3) positions; adaln: this step's row of
        adaln_schedule() (then timestep, guidance and pooled_projections are not read). Extra keyword arguments that
        diffusers' pipelines pass (joint_attention_kwargs, ...) are accepted and ignored."""
        r = self._start(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                        guidance, adaln)  # fmt: skip
        x = self._blocks(r, 0, self.num_blocks, streams=(r.img, r.txt))
        return self._output(self._finish(r, x[:, r.n_txt - r.keep :]), return_dict)

    # ---- the forward in parts: step caching (runtime/step_cache.py) ----------------------------------
    # Blocks are numbered 0..num_blocks-1, the dual-stream ones first. A head of `head_blocks` blocks leaves
    # the residual stream as one [text | image] tensor ("head_state", every deferred residual added);
    # the tail runs the other blocks from it. The image rows of (tail output - head state) are the residual
    # a skipped step adds back (the text rows never reach the output).
    step_state_names = ("head_state",)
    step_residual_names = ("residual",)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer_blocks) + len(self.single_transformer_blocks)

    def forward_head(self, *, head_blocks: int, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, head_state): the residual stream after the first head_blocks blocks, and the image rows
        of what they added to it (this rank's real rows only, under sequence parallelism), which the step
        cache compares from step to step. `inputs`: forward's arguments."""
        r = self._start(**_forward_inputs(inputs))
        x = self._blocks(r, 0, self._head_blocks(head_blocks), streams=(r.img, r.txt))
        return unpadded_rows(r.seq, x[:, r.n_txt :] - r.img, 1), x

    def forward_tail(self, *, head_blocks: int, head_state: torch.Tensor, **inputs):
        """(output, residual): forward's output (as forward(..., return_dict=False)[0]) computed from
        forward_head's state, and the image rows of what the remaining blocks added to that state."""
        r = self._start(**_forward_inputs(inputs), embed=False)
        start = self._head_blocks(head_blocks)
        if start < len(self.transformer_blocks):  # the tail starts in the dual-stream blocks
            streams = (head_state[:, r.n_txt :], head_state[:, : r.n_txt])
            x = self._blocks(r, start, self.num_blocks, streams=streams)
        else:
            x = self._blocks(r, start, self.num_blocks, x=head_state)
        img = x[:, r.n_txt - r.keep :]
        return self._finish(r, img), img - head_state[:, r.n_txt :]

    def forward_reuse(self, *, head_blocks: int, head_state: torch.Tensor, residual: torch.Tensor, **inputs):
        """forward's output with the tail replaced by a residual from an earlier step (forward_tail's)."""
        self._head_blocks(head_blocks)
        r = self._start(**_forward_inputs(inputs), embed=False)
        return self._finish(r, head_state[:, r.n_txt :] + residual)

    def _head_blocks(self, head_blocks: int) -> int:
        if not 1 <= head_blocks < self.num_blocks:
            raise ValueError(
                f"head_blocks must be between 1 and {self.num_blocks - 1} for this FLUX DiT, got {head_blocks}"
            )
        return head_blocks

    def _start(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
        adaln, embed: bool = True,
    ) -> _FluxRun:  # fmt: skip
        """What every block reads (conditioning, adaLN projections, RoPE, the sequence layout), and with
        `embed` the embedded image and text tokens."""
        # Sequence parallelism (a no-op alone): this rank keeps its share of the image tokens; the text
        # tokens stay whole and lead every joint attention.
        n_txt = encoder_hidden_states.shape[1]
        seq = shard_sequence(hidden_states.shape[1], replicated_prefix=n_txt)
        hidden_states = seq.shard(hidden_states, 1)
        img = self.x_embedder(hidden_states) if embed else None
        batch, device = hidden_states.shape[0], hidden_states.device
        if adaln is None:
            cond = self._conditioning(timestep, guidance, pooled_projections, batch, device)
            projected = self._projected_adaln(cond)
        else:  # this step's row of adaln_schedule(): the projections are done
            if self.adaln_weight is None or adaln.shape != (batch, self.adaln_weight.shape[0]):
                raise ValueError(
                    f"adaln must be one step of adaln_schedule(), shape (batch={batch}, "
                    f"{None if self.adaln_weight is None else self.adaln_weight.shape[0]}); got {tuple(adaln.shape)}"
                )
            cond, projected = None, iter(adaln.split(self._adaln_sizes, dim=-1))
        layers = 2 * len(self.transformer_blocks) + len(self.single_transformer_blocks) + 1
        projected = [next(projected) for _ in range(layers)]  # in the order the blocks read them
        txt = self.context_embedder(encoder_hidden_states) if embed else None

        # 3-D ids (with a batch dim) are a deprecated diffusers input; all rows are identical.
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = seq.shard(img_ids[0] if img_ids.ndim == 3 else img_ids, 0)
        rope = axes_rope(torch.cat([txt_ids, img_ids]), self.config.axes_dims_rope)
        dtype = self.x_embedder.weight.dtype
        # On CUDA and unsharded, the last block computes the image rows only. Sharded, every rank's layout
        # must stay [text | its image shard] for the all-to-alls; on the CPU the full-row GEMMs keep
        # diffusers' exact rounding (a CPU GEMM over fewer rows may block its sums differently).
        keep = n_txt if seq is UNSHARDED and hidden_states.is_cuda else 0
        # Each block leaves its last residual for the next block's first pass (see _enter). Not in float16,
        # where the residual stream is clamped after every block (clip_fp16).
        return _FluxRun(seq, img, txt, cond, projected, rope, n_txt, keep, defer=dtype != torch.float16)

    def _blocks(self, r: _FluxRun, start: int, stop: int, streams=None, x=None) -> torch.Tensor:
        """Blocks start..stop-1 over `streams` (image, text: where start is a dual-stream block) or the
        joint [text | image] `x`; returns the joint residual stream after them, every deferred residual
        added (only the image rows when the last block is run and r.keep)."""
        n_dual = len(self.transformer_blocks)
        if x is None:
            img, txt = streams
            pending = (None, None)
            for i in range(start, min(stop, n_dual)):
                projected = (r.projected[2 * i], r.projected[2 * i + 1])
                out = self.transformer_blocks[i](
                    img, txt, r.cond, r.rope, projected, pending=pending, defer=r.defer
                )
                img, txt, pending = out if r.defer else (*out, (None, None))
            if pending[0] is not None:
                img, txt = gated_residual(img, *pending[0]), gated_residual(txt, *pending[1])
            # The single-stream blocks see one sequence; keep it joined instead of splitting after each block.
            x = torch.cat([txt, img], dim=1)
        last = self.num_blocks - 1
        pending = None
        for i in range(max(start, n_dual), stop):
            block = self.single_transformer_blocks[i - n_dual]
            out = block(
                x, r.cond, r.rope, r.projected[n_dual + i], r.keep if i == last else 0, pending=pending,
                defer=r.defer,
            )  # fmt: skip
            x, pending = out if r.defer else (out, None)
        if pending is not None:
            x = gated_residual(x, *pending)
        return x

    def _finish(self, r: _FluxRun, img: torch.Tensor) -> torch.Tensor:
        """The final adaLN and projection of the image rows, gathered over the sequence-parallel ranks."""
        scale, shift = self.norm_out(None if r.cond is None else r.cond.to(img.dtype), r.projected[-1])
        out = self.proj_out(norm_modulate(img, shift, scale, _EPS))
        return r.seq.gather(out, 1)


@dataclasses.dataclass
class _FluxRun:
    """What the blocks of one forward (or one part of it) share."""

    seq: object  # ulysses.SequenceShards, or UNSHARDED
    img: torch.Tensor | None
    txt: torch.Tensor | None
    cond: torch.Tensor | None
    projected: list  # each adaLN layer's projection (None: the layer projects cond itself)
    rope: tuple[torch.Tensor, torch.Tensor]
    n_txt: int
    keep: int
    defer: bool


_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids")


def _forward_inputs(inputs: dict) -> dict:
    """forward's keyword arguments -> _start's (return_dict and unknown extras dropped, as forward drops
    them)."""
    missing = [name for name in _INPUTS if name not in inputs]
    if missing:
        raise TypeError(f"missing FLUX DiT inputs {missing}")
    return {name: inputs[name] for name in _INPUTS} | {k: inputs.get(k) for k in ("guidance", "adaln")}
