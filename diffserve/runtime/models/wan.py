"""Wan2.1 / Wan2.2 text-to-video transformer: 3-D patch embedding, blocks of self-attention (3-axis RoPE),
cross-attention to the text, and a GELU MLP, each modulated by the timestep (adaLN with a learned table).
Parameter names match diffusers' WanTransformer3DModel, so its checkpoints load unchanged.

Wan2.2 TI2V-5B passes one timestep per token (shape (batch, seq)); the modulation then varies per token.
Wan2.1 I2V (image_dim / added_kv_proj_dim): the CLIP image states, through the condition embedder's
image_embedder, lead the cross-attention context; every cross-attention attends to them with its own key/value
projections (add_k_proj/add_v_proj, norm_added_k) and adds that to its text attention. The last TEXT_TOKENS
context rows are the text, as in the reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.runtime.distributed.ulysses import sequence_parallel_attention, shard_sequence
from diffserve.runtime.layers.attention import attention
from diffserve.runtime.layers.embeddings import MLPEmbedder, timestep_sinusoid
from diffserve.runtime.layers.fp8 import (
    Fp8Linear,
    Quantized,
    fp8_layers,
    norm_modulate_quant,
    residual_norm_modulate_quant,
)
from diffserve.runtime.layers.mlp import FeedForward
from diffserve.runtime.layers.modulation import (
    gated_residual,
    linear_residual_,
    norm_modulate,
    offset_norm_modulate,
    residual_norm_modulate,
)
from diffserve.runtime.layers.rope import grid_rope, norm_rope
from diffserve.runtime.models.base import DiTConfig, NativeDiT, fuse_linears
from diffserve.runtime.step_cache import unpadded_rows

TEXT_TOKENS = 512  # the UMT5 context length; image context rows come first (the reference hard-codes it too)


@dataclasses.dataclass
class WanConfig(DiTConfig):
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    # The reference applies RMS norm over all heads to q and k whatever this says; so do we.
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        if self.pos_embed_seq_len is not None:
            raise ValueError(
                "Wan first-last-frame conditioning (pos_embed_seq_len in config.json, FLF2V) is not supported"
            )
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                "a Wan image-to-video DiT needs both image_dim and added_kv_proj_dim in config.json"
            )
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        # Height and width get 2*(head_dim//6) channels each, time the rest: 44/42/42 for head_dim 128.
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw


class WanAttention(nn.Module):
    """Self-attention (with RoPE) or cross-attention to the text; q/k RMS-normalised across all heads.

    After fuse_projections() (done by WanBlock, which knows which is which) self-attention takes q|k|v
    from one GEMM (`qkv_weight`) and cross-attention k|v of the text from one (`kv_weight`). After
    layers.fp8.quantize_linears a quantised fused projection is the Fp8Linear `qkv` (`kv`), and the input x
    may arrive quantised (a Quantized written by the block's adaLN pass)."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])  # .1 was dropout
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_dim is not None:  # I2V cross-attention: the image context's own keys and values
            self.add_k_proj, self.add_v_proj = nn.Linear(added_kv_dim, dim), nn.Linear(added_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        for name in ("qkv_weight", "qkv_bias", "kv_weight", "kv_bias", "add_kv_weight", "add_kv_bias"):
            self.register_buffer(name, None, persistent=False)
        self.fp8_attention = False  # self-attention in FP8 (layers/attention.use_fp8_attention)

    def query_fp8(self, cross: bool) -> bool:
        """Whether every projection of x (self-attention: q, k, v; cross-attention: q) is FP8."""
        return fp8_layers(self.to_q) if cross else fp8_layers(self.to_q, self.to_k, self.to_v)

    def _fp8(self, name: str) -> Fp8Linear | None:
        layer = getattr(self, name, None)
        return layer if isinstance(layer, Fp8Linear) else None

    def _project(self, x: torch.Tensor | Quantized, context: torch.Tensor | None):
        dim = self.to_q.out_features
        if context is None and self.qkv_weight is not None:
            return F.linear(x, self.qkv_weight, self.qkv_bias).split(dim, dim=-1)
        if context is None and self._fp8("qkv") is not None:
            return self._fp8("qkv")(x).split(dim, dim=-1)
        if context is not None and self.kv_weight is not None:
            return (self.to_q(x), *F.linear(context, self.kv_weight, self.kv_bias).split(dim, dim=-1))
        if context is not None and self._fp8("kv") is not None:
            return (self.to_q(x), *self._fp8("kv")(context).split(dim, dim=-1))
        kv = x if context is None else context
        return self.to_q(x), self.to_k(kv), self.to_v(kv)

    def forward(
        self, x: torch.Tensor | Quantized, context: torch.Tensor | None = None, rope=None
    ) -> torch.Tensor:
        return self.to_out[0](self.attend(x, context, rope))

    def attend(
        self, x: torch.Tensor | Quantized, context: torch.Tensor | None = None, rope=None
    ) -> torch.Tensor:
        """The attention output before the output projection, (batch, seq, dim)."""
        image = None
        if context is not None and self.add_k_proj is not None:  # I2V: [image rows | TEXT_TOKENS text rows]
            image, context = context[:, :-TEXT_TOKENS], context[:, -TEXT_TOKENS:]
        q, k, v = self._project(x, context)
        head_dim = q.shape[-1] // self.heads
        q, k = norm_rope(q, self.norm_q, rope, head_dim), norm_rope(k, self.norm_k, rope, head_dim)
        v = v.unflatten(-1, (self.heads, head_dim))
        # Cross-attention keys are the text, whole on every rank: no exchange even when sequence-parallel.
        if context is None:
            out = sequence_parallel_attention(q, k, v, fp8=self.fp8_attention)
        else:
            out = attention(q, k, v)
        if image is not None:
            dim = self.add_k_proj.out_features
            if self.add_kv_weight is not None:
                k_img, v_img = F.linear(image, self.add_kv_weight, self.add_kv_bias).split(dim, dim=-1)
            else:
                k_img, v_img = self.add_k_proj(image), self.add_v_proj(image)
            k_img = norm_rope(k_img, self.norm_added_k, None, head_dim)
            # the text and image attentions summed in place (out is this call's own tensor)
            out = out.add_(attention(q, k_img, v_img.unflatten(-1, (self.heads, head_dim))))
        return out.flatten(2)


class WanBlock(nn.Module):
    def __init__(self, c: WanConfig):
        super().__init__()
        dim = c.inner_dim
        self.eps = c.eps
        self.attn1 = WanAttention(dim, c.num_attention_heads, c.eps)
        self.attn2 = WanAttention(dim, c.num_attention_heads, c.eps, c.added_kv_proj_dim)
        # norm1/norm3 have no parameters (their scale and shift come from the modulation).
        self.norm2 = nn.LayerNorm(dim, eps=c.eps) if c.cross_attn_norm else None
        self.ffn = FeedForward(dim, c.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim))

    def fuse_projections(self) -> None:
        fuse_linears(self.attn1, ("to_q", "to_k", "to_v"), "qkv")
        fuse_linears(self.attn2, ("to_k", "to_v"), "kv")
        if self.attn2.add_k_proj is not None:
            fuse_linears(self.attn2, ("add_k_proj", "add_v_proj"), "add_kv")

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb6: torch.Tensor, rope, offset=None):
        """(x, offset) -> (x, offset): the residual stream is x + offset, offset a float32 (batch, 1, dim)
        vector (or None) that collects the output projections' biases (see forward_folded)."""
        # temb6: (batch, 1 or seq, 6, dim). Modulation is float32, as are the norms (trained that way).
        mods = (self.scale_shift_table + temb6.float()).unbind(2)
        if temb6.shape[1] == 1 and self.norm2 is not None and self.foldable():
            return self.forward_folded(x, context, mods, rope, offset)
        if offset is not None:
            x = gated_residual(x, offset, None)
        return self.forward_unfolded(x, context, mods, rope), None

    def foldable(self) -> bool:
        """Whether forward_folded can run: it folds the gates into the output projections' weights and
        accumulates their GEMMs into x, which an FP8 layer cannot (torch._scaled_mm neither scales its
        weight per sample nor accumulates). With FP8 output projections the block runs unfolded: each
        residual add then happens in the adaLN pass that also writes the next GEMM's input quantised."""
        layers = (self.attn1.to_out[0], self.attn2.to_out[0], self.ffn.net[2])
        return not any(isinstance(layer, Fp8Linear) for layer in layers)

    def forward_folded(self, x, context, mods, rope, offset):
        """Per-sample modulation: each residual add happens inside the output GEMM (linear_residual_, the
        gate folded into the weight) and the biases go to `offset`, so the elementwise passes left are the
        three norms, none of which writes the stream. Same function as forward_unfolded up to rounding."""
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = mods
        h = offset_norm_modulate(x, offset, shift, scale, self.eps, upcast=True)
        out1, out2, ffn_out = self.attn1.to_out[0], self.attn2.to_out[0], self.ffn.net[2]
        x = linear_residual_(x, self.attn1.attend(h, rope=rope), out1.weight, gate)
        offset = gate * out1.bias.float() + (0 if offset is None else offset)
        h = offset_norm_modulate(x, offset, self.norm2.bias, self.norm2.weight, self.eps, True, affine=True)
        x = linear_residual_(x, self.attn2.attend(h, context=context), out2.weight)
        offset = offset + out2.bias.float()
        h = offset_norm_modulate(x, offset, mlp_shift, mlp_scale, self.eps, upcast=True)
        x = linear_residual_(x, self.ffn.hidden(h), ffn_out.weight, mlp_gate)
        return x, offset + mlp_gate * ffn_out.bias.float()

    def forward_unfolded(self, x, context, mods, rope) -> torch.Tensor:
        """Where a GEMM's input projections are all FP8, the pass writing that input writes it quantised
        (the *_quant forms of the same functions; layers/fp8.py)."""
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = mods
        quantized = self.attn1.query_fp8(cross=False)
        h = (norm_modulate_quant if quantized else norm_modulate)(x, shift, scale, self.eps, upcast=True)
        attn = self.attn1(h, rope=rope)
        modulate = (
            residual_norm_modulate_quant if self.attn2.query_fp8(cross=True) else residual_norm_modulate
        )
        if self.norm2 is not None:  # the cross-attention input: an affine LayerNorm, in float32
            x, h = modulate(
                x, attn, gate, self.norm2.bias, self.norm2.weight, self.eps, upcast=True, affine=True
            )
        else:
            x = h = gated_residual(x, attn, gate)
        modulate = (
            residual_norm_modulate_quant if fp8_layers(self.ffn.net[0].proj) else residual_norm_modulate
        )
        x, h = modulate(x, self.attn2(h, context=context), None, mlp_shift, mlp_scale, self.eps, upcast=True)
        return gated_residual(x, self.ffn(h), mlp_gate)  # float32 gate: the sum is taken in float32


class _ImageEmbedder(nn.Module):
    """CLIP image states -> model width: float32 LayerNorm, a GELU (erf) MLP of the same width, LayerNorm.
    Submodule names as diffusers' WanImageEmbedding (ff.net.0.proj, ff.net.2)."""

    def __init__(self, image_dim: int, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(image_dim, dim)])
        self.ff.net[0].proj = nn.Linear(image_dim, image_dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        dtype = image.dtype
        h = F.layer_norm(
            image.float(),
            self.norm1.normalized_shape,
            self.norm1.weight.float(),
            self.norm1.bias.float(),
            self.norm1.eps,
        ).to(dtype)
        h = self.ff.net[2](F.gelu(self.ff.net[0].proj(h)))
        return F.layer_norm(
            h.float(),
            self.norm2.normalized_shape,
            self.norm2.weight.float(),
            self.norm2.bias.float(),
            self.norm2.eps,
        ).to(dtype)


class _ConditionEmbedder(nn.Module):
    """Timestep -> (temb, 6 modulation vectors per block); text embeddings -> model width; I2V: the image
    states -> model width, placed before the text in the cross-attention context."""

    def __init__(self, c: WanConfig):
        super().__init__()
        dim = c.inner_dim
        self.freq_dim = c.freq_dim
        self.time_embedder = MLPEmbedder(c.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLPEmbedder(c.text_dim, dim, act="gelu_tanh")
        self.image_embedder = _ImageEmbedder(c.image_dim, dim) if c.image_dim is not None else None

    def forward(self, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None = None):
        t = timestep_sinusoid(timestep, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t).to(text.dtype)
        context = self.text_embedder(text)
        if (image is None) != (self.image_embedder is None):
            raise ValueError(
                "this Wan DiT needs the image states (encoder_hidden_states_image)"
                if image is None
                else "this Wan DiT takes no image states (encoder_hidden_states_image)"
            )
        if image is not None:
            if text.shape[1] != TEXT_TOKENS:
                raise ValueError(f"an I2V Wan DiT takes {TEXT_TOKENS} text tokens, got {text.shape[1]}")
            image = self.image_embedder(image)
            context = torch.cat([image.expand(context.shape[0], -1, -1), context], dim=1)
        return temb, self.time_proj(F.silu(temb)), context


class WanTransformer(NativeDiT):
    config_class = WanConfig
    # As diffusers: these stay float32 when loading in half precision (time embedding, modulation tables,
    # the cross-attention norm).
    keep_fp32_modules = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    ignored_checkpoint_keys = ("norm_added_q",)

    def __init__(self, config: WanConfig):
        super().__init__(config)
        c = config
        dim = c.inner_dim
        self.patch_embedding = nn.Conv3d(c.in_channels, dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.condition_embedder = _ConditionEmbedder(c)
        self.blocks = nn.ModuleList(WanBlock(c) for _ in range(c.num_layers))
        self.proj_out = nn.Linear(dim, c.out_channels * math.prod(c.patch_size))
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear/Conv3d initialise themselves; the tables follow the reference's randn / sqrt(dim).
        if not self.scale_shift_table.is_meta:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name.endswith("scale_shift_table"):
                        p.normal_().div_(self.config.inner_dim**0.5)

    def _patchify(self, video: torch.Tensor) -> torch.Tensor:
        """(batch, C, F, H, W) -> (batch, tokens, dim). The conv has kernel == stride, so it is a linear
        map of each patch; run it as one matmul over patches."""
        b, c, f, h, w = video.shape
        pt, ph, pw = self.config.patch_size
        video = video[:, :, : f - f % pt, : h - h % ph, : w - w % pw]  # the conv drops partial patches
        patches = video.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4).flatten(1, 3)
        weight = self.patch_embedding.weight.flatten(1)
        return F.linear(patches.to(weight.dtype), weight, self.patch_embedding.bias)

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b = x.shape[0]
        pt, ph, pw = self.config.patch_size
        x = x.reshape(b, *grid, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (b, C, F', pt, H', ph, W', pw)
        return x.reshape(b, x.shape[1], grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        **ignored,
    ):
        """hidden_states (batch, C, frames, H, W) latents; timestep (batch,) or per token (batch, seq) in
        scheduler units; encoder_hidden_states (batch, text_seq, text_dim). Extra keyword arguments that
        diffusers' pipelines pass (attention_kwargs, ...) are accepted and ignored."""
        r = self._start(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
        x, offset = self._blocks(r, r.x, None, 0, len(self.blocks))
        return self._output(self._finish(r, x, offset), return_dict)

    # ---- the forward in parts: step caching (runtime/step_cache.py) ----------------------------------
    # A head of `head_blocks` blocks leaves the residual stream as (head_state, head_offset): x and the
    # float32 per-channel offset the folded blocks carry beside it (None when they run unfolded); the tail
    # runs the other blocks from there. What the tail adds to each is the residual a skipped step adds back.
    step_state_names = ("head_state", "head_offset")
    step_residual_names = ("residual", "residual_offset")

    def forward_head(self, *, head_blocks: int, **inputs) -> tuple[torch.Tensor, ...]:
        """(signal, head_state[, head_offset]): the residual stream after the first head_blocks blocks,
        and what they added to it (this rank's real rows only, under sequence parallelism), which the step
        cache compares from step to step. `inputs`: forward's arguments."""
        r = self._start(**_forward_inputs(inputs))
        x_in = r.x.clone()  # the folded blocks add to x in place
        x, offset = self._blocks(r, r.x, None, 0, self._head_blocks(head_blocks))
        signal = x - x_in if offset is None else x - x_in + offset.to(x.dtype)
        signal = unpadded_rows(r.seq, signal, 1)
        return (signal, x) if offset is None else (signal, x, offset)

    def forward_tail(
        self, *, head_blocks: int, head_state: torch.Tensor, head_offset: torch.Tensor | None = None, **inputs
    ) -> tuple[torch.Tensor, ...]:
        """(output, residual[, residual_offset]): forward's output (as forward(..., return_dict=False)[0])
        computed from forward_head's state, and what the remaining blocks added to that state."""
        r = self._start(**_forward_inputs(inputs), embed=False)
        start = self._head_blocks(head_blocks)
        x, offset = self._blocks(r, head_state.clone(), head_offset, start, len(self.blocks))
        out = self._finish(r, x, offset)
        if offset is None:
            return out, x - head_state
        return out, x - head_state, offset - (0 if head_offset is None else head_offset)

    def forward_reuse(
        self,
        *,
        head_blocks: int,
        head_state: torch.Tensor,
        residual: torch.Tensor,
        head_offset: torch.Tensor | None = None,
        residual_offset: torch.Tensor | None = None,
        **inputs,
    ) -> torch.Tensor:
        """forward's output with the tail replaced by residuals from an earlier step (forward_tail's)."""
        self._head_blocks(head_blocks)
        r = self._start(**_forward_inputs(inputs), embed=False)
        if residual_offset is not None:
            head_offset = residual_offset if head_offset is None else head_offset + residual_offset
        return self._finish(r, head_state + residual, head_offset)

    def _head_blocks(self, head_blocks: int) -> int:
        if not 1 <= head_blocks < len(self.blocks):
            raise ValueError(
                f"head_blocks must be between 1 and {len(self.blocks) - 1} for this Wan DiT, got {head_blocks}"
            )
        return head_blocks

    def _start(
        self,
        hidden_states,
        timestep,
        encoder_hidden_states,
        encoder_hidden_states_image=None,
        embed: bool = True,
    ) -> _WanRun:
        """What every block reads (modulation, text context, RoPE, the sequence layout), and with `embed` the
        patch-embedded tokens (this rank's share)."""
        c = self.config
        b, _, f, h, w = hidden_states.shape
        grid = (f // c.patch_size[0], h // c.patch_size[1], w // c.patch_size[2])
        if max(grid) > c.rope_max_seq_len:
            raise ValueError(f"latent grid {grid} exceeds rope_max_seq_len {c.rope_max_seq_len}")
        device = hidden_states.device
        rope = grid_rope(grid, c.rope_axes, device)
        # Sequence parallelism (a no-op alone): this rank keeps its share of the video tokens and their RoPE.
        seq = shard_sequence(math.prod(grid))
        x = None
        if embed:
            # contiguous: the folded blocks accumulate into x in place (a no-op unless sharded, batch > 1)
            x = seq.shard(self._patchify(hidden_states), 1).contiguous()
        rope = tuple(seq.shard(r, 0) for r in rope)

        timestep = self._per_sample(timestep, b, device)
        temb, temb6, context = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, encoder_hidden_states_image
        )
        # One modulation per sample (batch, 1, ...) or per token (batch, seq, ...), broadcast over tokens.
        temb = temb.reshape(b, -1, 1, temb.shape[-1])
        temb6 = temb6.reshape(b, -1, 6, temb.shape[-1])
        if temb.shape[1] > 1:  # per-token modulation follows its tokens
            temb, temb6 = seq.shard(temb, 1), seq.shard(temb6, 1)
        return _WanRun(seq, grid, x, rope, temb, temb6, context)

    def _blocks(self, r: _WanRun, x, offset, start: int, stop: int):
        """Blocks start..stop-1 from the residual stream (x, offset); returns it after them."""
        for block in self.blocks[start:stop]:
            x, offset = block(x, r.context, r.temb6, r.rope, offset)
        return x, offset

    def _finish(self, r: _WanRun, x: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """The final adaLN and projection, gathered over the sequence-parallel ranks, as latents."""
        shift, scale = (self.scale_shift_table + r.temb).unbind(2)
        x = self.proj_out(offset_norm_modulate(x, offset, shift, scale, self.config.eps, upcast=True))
        return self._unpatchify(r.seq.gather(x, 1), r.grid)


@dataclasses.dataclass
class _WanRun:
    """What the blocks of one forward (or one part of it) share."""

    seq: object  # ulysses.SequenceShards, or UNSHARDED
    grid: tuple[int, int, int]
    x: torch.Tensor | None  # the patch-embedded tokens (None when not embedded)
    rope: tuple[torch.Tensor, torch.Tensor]
    temb: torch.Tensor
    temb6: torch.Tensor
    context: torch.Tensor


def _forward_inputs(inputs: dict) -> dict:
    """forward's keyword arguments -> _start's (return_dict and unknown extras dropped, as forward drops
    them)."""
    names = ("hidden_states", "timestep", "encoder_hidden_states")
    missing = [name for name in names if name not in inputs]
    if missing:
        raise TypeError(f"missing Wan DiT inputs {missing}")
    out = {name: inputs[name] for name in names}
    out["encoder_hidden_states_image"] = inputs.get("encoder_hidden_states_image")
    return out
