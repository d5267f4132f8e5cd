"""Qwen-Image transformer (Qwen-Image and Qwen-Image-Edit): 60 dual-stream MMDiT blocks over [text | image]
tokens, each block the FLUX dual-stream block under other names (image and text keep their own adaLN, q/k/v
and MLP weights and attend jointly), without FLUX's single-stream blocks or pooled text; RMS-normed
Qwen2.5-VL states in, a centred 3-axis RoPE, one timestep embedding. Parameter names match diffusers'
QwenImageTransformer2DModel, so its checkpoints load unchanged.

Shared with FLUX: the joint attention module (FluxAttention: fused q|k|v per stream, the batch-1 joint buffer,
our attention backend), the fused adaLN/residual kernels and the fused adaLN projection GEMV. What differs
is computed here the way diffusers computes it (the timestep sinusoid scaled after the frequency product,
RoPE angles in float32), so the same weights give the same numbers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.runtime.layers.embeddings import MLPEmbedder
from diffserve.runtime.layers.mlp import FeedForward
from diffserve.runtime.layers.modulation import (
    AdaLNProjection,
    clip_fp16,
    gated_residual,
    norm_modulate,
    residual_norm_modulate,
)
from diffserve.runtime.models.base import DiTConfig, NativeDiT, fuse_linears
from diffserve.runtime.models.flux import FluxAttention

_EPS = 1e-6
_TIME_FREQ_DIM = 256
_ROPE_THETA = 10000.0


@dataclasses.dataclass
class QwenImageConfig(DiTConfig):
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )
        # Qwen-Image-Edit-2511 (zero_cond_t), Qwen-Image-Layered (additional t cond, layer RoPE) and a guidance
        # embedding (never shipped; diffusers' own forward cannot run it) are served by the generic path.
        unsupported = [
            name
            for name in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
            if getattr(self, name)
        ]
        if unsupported:
            raise ValueError(
                f"this Qwen-Image transformer sets {unsupported} in config.json, which the native Qwen-Image DiT "
                "does not support (Qwen-Image and Qwen-Image-Edit only)"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def timestep_proj(timestep: torch.Tensor, dim: int = _TIME_FREQ_DIM) -> torch.Tensor:
    """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000) on timesteps in
    [0, 1]: [cos | sin] of 1000 * t * freq, all in float32 with the scale applied after the product, as
    there. The frequencies must not be rounded to a bf16 timestep's dtype: at 1000 * t their 2^-9 rounding
    moves the angles by up to ~2 rad (the conditioning 14% off, the whole bf16 forward ~0.28 at 60 blocks)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = 1000 * (timestep[:, None].float() * torch.exp(exponent)[None, :])
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """pos * theta^(-2i/dim), i < dim/2, in float32 as diffusers' QwenEmbedRope builds its table."""
    inv_freq = 1.0 / torch.pow(
        _ROPE_THETA, torch.arange(0, dim, 2, device=positions.device).to(torch.float32).div(dim)
    )
    return torch.outer(positions.to(torch.float32), inv_freq)


def _centred(n: int, device) -> torch.Tensor:
    """Row (or column) positions centred on the image: -(n - n//2) .. n//2 - 1 (QwenEmbedRope scale_rope)."""
    return torch.arange(n, device=device) - (n - n // 2)


def qwen_rope(grids: tuple[tuple[int, int, int], ...], n_txt: int, axes: tuple[int, ...], device):
    """(cos, sin), each (n_txt + image tokens, head_dim // 2) float32, rows in [text | image 0 | image 1 ...]
    order. Image i's tokens sit at frame position i and centred rows/columns; the text tokens follow on the
    diagonal (the same position on every axis) from max(h // 2, w // 2) over the images."""
    parts = []
    for idx, (frames, h, w) in enumerate(grids):
        f_ang = _angles(torch.arange(idx, idx + frames, device=device), axes[0])
        h_ang, w_ang = _angles(_centred(h, device), axes[1]), _angles(_centred(w, device), axes[2])
        grid = (frames, h, w)
        parts.append(
            torch.cat(
                [
                    f_ang.view(frames, 1, 1, -1).expand(*grid, -1),
                    h_ang.view(1, h, 1, -1).expand(*grid, -1),
                    w_ang.view(1, 1, w, -1).expand(*grid, -1),
                ],
                dim=-1,
            ).reshape(frames * h * w, -1)
        )
    start = max(max(h // 2, w // 2) for _, h, w in grids)
    txt = torch.arange(start, start + n_txt, device=device)
    angles = torch.cat([torch.cat([_angles(txt, d) for d in axes], dim=-1), *parts])
    return angles.cos(), angles.sin()


def image_grids(img_shapes) -> tuple[tuple[int, int, int], ...]:
    """diffusers' img_shapes (per sample a list of (frames, h, w), or one sample's list, or one grid) ->
    one sample's grids as a tuple of tuples. As diffusers, every sample is taken to have the first's."""
    if img_shapes is None:
        raise ValueError("img_shapes is required: (frames, height, width) of each image's packed latent grid")
    if isinstance(img_shapes[0], int):
        return (tuple(int(v) for v in img_shapes),)
    if isinstance(img_shapes[0][0], int):
        return tuple(tuple(int(v) for v in s) for s in img_shapes)
    return image_grids(img_shapes[0])


class QwenAttention(FluxAttention):
    """FLUX's dual-stream joint attention (same parameter names), plus diffusers' padding mask over the
    text tokens: with a mask the joint attention runs in torch's SDPA with [mask | ones] as its mask (the
    flash kernels take none). Our pipelines never pad (one prompt per call) and pass no mask."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__(dim, heads, head_dim, dual=True)

    def forward(self, x, rope, context=None, queries_from: int = 0, mask: torch.Tensor | None = None):
        if mask is None:
            return super().forward(x, rope, context=context)
        n_txt = context.shape[1]
        cos, sin = rope
        cq, ck, cv = self._stream(context, "add_", (cos[:n_txt], sin[:n_txt]))
        q, k, v = self._stream(x, "", (cos[n_txt:], sin[n_txt:]))
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((cq, q), (ck, k), (cv, v)))
        joint = torch.cat([mask, mask.new_ones(mask.shape[0], x.shape[1])], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=joint).transpose(1, 2).flatten(2)
        return self.to_out[0](out[:, n_txt:].contiguous()), self.to_add_out(out[:, :n_txt].contiguous())


def _modulation(dim: int) -> nn.Sequential:
    # diffusers' img_mod / txt_mod: SiLU then the projection (names .1.weight/.1.bias). Our blocks read the
    # SiLU'd conditioning once per forward, so only the projection runs here.
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


def _enter(x: torch.Tensor, pending, shift: torch.Tensor, scale: torch.Tensor):
    """(x, modulated block input): the previous block's deferred gated MLP residual (pending = (y, gate), or
    None) is added in the same pass that normalises and modulates (as FLUX's blocks: one write and one read
    of each stream less per block boundary)."""
    if pending is None:
        return x, norm_modulate(x, shift, scale, _EPS)
    return residual_norm_modulate(x, pending[0], pending[1], shift, scale, _EPS)


class QwenImageBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.img_mod = _modulation(dim)
        self.attn = QwenAttention(dim, heads, head_dim)
        self.img_mlp = FeedForward(dim, 4 * dim)
        self.txt_mod = _modulation(dim)
        self.txt_mlp = FeedForward(dim, 4 * dim)

    def forward(self, img, txt, cond, rope, projected=(None, None), mask=None, pending=(None, None),
                defer: bool = False):  # fmt: skip
        """img/txt: the two residual streams; cond: silu(temb); projected: (image, text) modulation
        projections when already computed; pending/defer: the previous block's deferred MLP residuals and
        whether to leave this block's own for the next (then returns (img, txt, pending))."""
        img_proj = self.img_mod[1](cond) if projected[0] is None else projected[0]
        txt_proj = self.txt_mod[1](cond) if projected[1] is None else projected[1]
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = img_proj.unsqueeze(1).chunk(6, dim=-1)
        c_shift, c_scale, c_gate, c_mlp_shift, c_mlp_scale, c_mlp_gate = txt_proj.unsqueeze(1).chunk(
            6, dim=-1
        )
        img, img_in = _enter(img, pending[0], shift, scale)
        txt, txt_in = _enter(txt, pending[1], c_shift, c_scale)
        img_attn, txt_attn = self.attn(img_in, rope, context=txt_in, mask=mask)

        img, h = residual_norm_modulate(img, img_attn, gate, mlp_shift, mlp_scale, _EPS)
        img_mlp = self.img_mlp(h)
        txt, h = residual_norm_modulate(txt, txt_attn, c_gate, c_mlp_shift, c_mlp_scale, _EPS)
        txt_mlp = self.txt_mlp(h)
        if defer:
            return img, txt, ((img_mlp, mlp_gate), (txt_mlp, c_mlp_gate))
        return clip_fp16(gated_residual(img, img_mlp, mlp_gate)), clip_fp16(
            gated_residual(txt, txt_mlp, c_mlp_gate)
        )


class _TimeEmbed(nn.Module):
    """diffusers' QwenTimestepProjEmbeddings (names time_text_embed.timestep_embedder.linear_1/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(_TIME_FREQ_DIM, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_proj(timestep).to(dtype))


class QwenImageTransformer(NativeDiT):
    config_class = QwenImageConfig

    def __init__(self, config: QwenImageConfig):
        super().__init__(config)
        c = config
        dim, heads, head_dim = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        self.time_text_embed = _TimeEmbed(dim)
        self.txt_norm = nn.RMSNorm(c.joint_attention_dim, eps=_EPS)
        self.img_in = nn.Linear(c.in_channels, dim)
        self.txt_in = nn.Linear(c.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(dim, heads, head_dim) for _ in range(c.num_layers)
        )
        # diffusers' AdaLayerNormContinuous: the projection yields (scale, shift) in that order.
        self.norm_out = AdaLNProjection(dim, 2)
        out_channels = c.out_channels or c.in_channels
        self.proj_out = nn.Linear(dim, c.patch_size * c.patch_size * out_channels)
        self.register_buffer("adaln_weight", None, persistent=False)
        self.register_buffer("adaln_bias", None, persistent=False)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer_blocks)

    def _adaln_layers(self) -> list[str]:
        names = []
        for i in range(self.num_blocks):
            names += [f"transformer_blocks.{i}.img_mod.1", f"transformer_blocks.{i}.txt_mod.1"]
        return [*names, "norm_out.linear"]

    def fuse_projections(self):
        """Also fuse the 121 adaLN projections (Qwen-Image: 6.8 GB in bf16, all reading silu(temb)) into one
        GEMV, as FLUX's: at batch 1 they are weight reads, and one long read runs at full bandwidth."""
        super().fuse_projections()
        layers = self._adaln_layers()
        fuse_linears(self, tuple(layers), "adaln")
        self._adaln_sizes = [self.get_submodule(name).out_features for name in layers]
        return self

    def _txt_norm(self, states: torch.Tensor) -> torch.Tensor:
        """diffusers' RMSNorm: the mean square in float32, the product rounded to a half-precision weight's
        dtype before the weight multiplies."""
        variance = states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        out = states * torch.rsqrt(variance + _EPS)
        weight = self.txt_norm.weight
        if weight.dtype in (torch.float16, torch.bfloat16):
            out = out.to(weight.dtype)
        return out * weight

    def conditioning(self, timestep, batch: int, device) -> torch.Tensor:
        """silu(temb) for timesteps in [0, 1] (rounded to the activation dtype first, as diffusers)."""
        dtype = self.img_in.weight.dtype
        t = self._per_sample(timestep, batch, device).to(dtype)
        return F.silu(self.time_text_embed(t, dtype))

    def adaln_schedule(self, timesteps: torch.Tensor, batch: int) -> torch.Tensor | None:
        """Every adaLN projection of every step, (steps, batch, total), computed in one GEMM before the loop
        (the conditioning depends on the timestep alone): row i is forward(..., adaln=schedule[i]). None when
        the projections are not fused. timesteps (steps,) in [0, 1] as forward takes them."""
        if self.adaln_weight is None:
            return None
        steps, device = timesteps.shape[0], self.adaln_weight.device
        per_step = timesteps.to(device).reshape(steps, 1).expand(steps, batch).reshape(-1)
        cond = self.conditioning(per_step, steps * batch, device)
        return F.linear(cond, self.adaln_weight, self.adaln_bias).view(steps, batch, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_shapes=None,
        return_dict: bool = True,
        adaln: torch.Tensor | None = None,
        **ignored,
    ):
        """hidden_states (batch, image tokens, in_channels): packed latents, every image of img_shapes in
        order; encoder_hidden_states (batch, text tokens, joint_attention_dim); encoder_hidden_states_mask
        (batch, text tokens) or None (no padding); timestep in [0, 1] per sample; img_shapes as diffusers'
        ((frames, h, w) per image); adaln: this step's row of adaln_schedule(). Extra keyword arguments
        diffusers' pipelines pass (guidance=None, attention_kwargs, ...) are accepted and ignored."""
        r = self._start(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes,
                        adaln)  # fmt: skip
        x = self._blocks(r, 0, self.num_blocks, r.img, r.txt)
        return self._output(self._finish(r, x[:, r.n_txt :]), return_dict)

    # ---- the forward in parts: step caching (runtime/step_cache.py) ----------------------------------
    # A head of `head_blocks` blocks leaves the residual stream as one [text | image] tensor (every deferred
    # residual added); the tail runs the other blocks from it. The image rows of (tail output - head state)
    # are the residual a skipped step adds back.
    step_state_names = ("head_state",)
    step_residual_names = ("residual",)

    def forward_head(self, *, head_blocks: int, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, head_state): the joint residual stream after the first head_blocks blocks, and the image
        rows of what they added (what the step cache compares from step to step)."""
        r = self._start(**_forward_inputs(inputs))
        x = self._blocks(r, 0, self._head_blocks(head_blocks), r.img, r.txt)
        return x[:, r.n_txt :] - r.img, x

    def forward_tail(self, *, head_blocks: int, head_state: torch.Tensor, **inputs):
        """(output, residual): forward's output computed from forward_head's state, and the image rows of
        what the remaining blocks added to it."""
        r = self._start(**_forward_inputs(inputs), embed=False)
        n = r.n_txt
        x = self._blocks(
            r, self._head_blocks(head_blocks), self.num_blocks, head_state[:, n:], head_state[:, :n]
        )
        return self._finish(r, x[:, n:]), x[:, n:] - head_state[:, n:]

    def forward_reuse(self, *, head_blocks: int, head_state: torch.Tensor, residual: torch.Tensor, **inputs):
        """forward's output with the tail replaced by a residual from an earlier step (forward_tail's)."""
        self._head_blocks(head_blocks)
        r = self._start(**_forward_inputs(inputs), embed=False)
        return self._finish(r, head_state[:, r.n_txt :] + residual)

    def _head_blocks(self, head_blocks: int) -> int:
        if not 1 <= head_blocks < self.num_blocks:
            raise ValueError(
                f"head_blocks must be between 1 and {self.num_blocks - 1} for this Qwen-Image DiT, got {head_blocks}"
            )
        return head_blocks

    def _start(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_shapes,
               adaln, embed: bool = True) -> _QwenRun:  # fmt: skip
        grids = image_grids(img_shapes)
        tokens = sum(f * h * w for f, h, w in grids)
        if tokens != hidden_states.shape[1]:
            raise ValueError(
                f"img_shapes {grids} hold {tokens} tokens; hidden_states has {hidden_states.shape[1]}"
            )
        batch, device = hidden_states.shape[0], hidden_states.device
        n_txt = encoder_hidden_states.shape[1]
        img = txt = None
        if embed:
            img = self.img_in(hidden_states)
            txt = self.txt_in(self._txt_norm(encoder_hidden_states))
        if adaln is None:
            cond = self.conditioning(timestep, batch, device)
            if self.adaln_weight is None:
                projected = [None] * (2 * self.num_blocks + 1)
            else:
                projected = list(
                    F.linear(cond, self.adaln_weight, self.adaln_bias).split(self._adaln_sizes, -1)
                )
        else:
            if self.adaln_weight is None or adaln.shape != (batch, self.adaln_weight.shape[0]):
                raise ValueError(
                    f"adaln must be one step of adaln_schedule(), shape (batch={batch}, "
                    f"{None if self.adaln_weight is None else self.adaln_weight.shape[0]}); got {tuple(adaln.shape)}"
                )
            cond, projected = None, list(adaln.split(self._adaln_sizes, dim=-1))
        mask = encoder_hidden_states_mask
        if mask is not None:
            mask = mask.to(device=device, dtype=torch.bool)
        rope = qwen_rope(grids, n_txt, self.config.axes_dims_rope, device)
        # float16 clamps both streams after every block (as the reference), so nothing is deferred there.
        defer = self.img_in.weight.dtype != torch.float16
        return _QwenRun(img, txt, cond, projected, rope, mask, n_txt, defer)

    def _blocks(self, r: _QwenRun, start: int, stop: int, img, txt) -> torch.Tensor:
        """Blocks start..stop-1 on the two streams; returns the joint [text | image] stream after them."""
        pending = (None, None)
        for i in range(start, stop):
            projected = (r.projected[2 * i], r.projected[2 * i + 1])
            out = self.transformer_blocks[i](img, txt, r.cond, r.rope, projected, r.mask, pending, r.defer)
            img, txt, pending = out if r.defer else (*out, (None, None))
        if pending[0] is not None:
            img, txt = gated_residual(img, *pending[0]), gated_residual(txt, *pending[1])
        return torch.cat([txt, img], dim=1)

    def _finish(self, r: _QwenRun, img: torch.Tensor) -> torch.Tensor:
        cond = None if r.cond is None else r.cond.to(img.dtype)
        scale, shift = self.norm_out(cond, r.projected[-1])
        return self.proj_out(norm_modulate(img, shift, scale, _EPS))


@dataclasses.dataclass
class _QwenRun:
    """What the blocks of one forward (or one part of it) share."""

    img: torch.Tensor | None
    txt: torch.Tensor | None
    cond: torch.Tensor | None
    projected: list  # each adaLN layer's projection (None: the layer projects cond itself)
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    n_txt: int
    defer: bool


_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "img_shapes")


def _forward_inputs(inputs: dict) -> dict:
    """forward's keyword arguments -> _start's (return_dict and unknown extras dropped, as forward drops them)."""
    missing = [name for name in _INPUTS if name not in inputs]
    if missing:
        raise TypeError(f"missing Qwen-Image DiT inputs {missing}")
    return {name: inputs[name] for name in _INPUTS} | {
        k: inputs.get(k) for k in ("encoder_hidden_states_mask", "adaln")
    }
