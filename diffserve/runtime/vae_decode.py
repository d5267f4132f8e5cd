"""Wan VAE decoding that streams: what AutoencoderKLWan.decode computes, optionally in strips.

diffusers' decode runs the causal decoder one latent frame at a time (each yields 4 video frames; the
first yields 1), keeping the last two input frames of every causal convolution in a cache, and grows the
output with torch.cat at every frame (81 frames: 21 ever-longer copies). Here:

  * the output is allocated once and each chunk is written into place (and clamped there);
  * the decoder is split after its middle block. The front (conv_in + middle block, with the only
    spatially global op, the middle attention) runs at latent resolution on the whole frame; the back
    (up blocks + head, all at 1-8x the latent resolution) may run on `tiles` vertical strips of the
    latent frame, each with its own causal cache. Every op after the middle block is local in space
    (3x3 convolutions, nearest upsampling, RMS norms over channels only), so a strip widened by a halo of
    the back's receptive field (13 latent columns for Wan2.1) computes its core columns exactly as the
    whole frame would: the result equals vae.decode up to floating-point summation order (the
    convolution kernels see other shapes), not a blended approximation like diffusers' tiled decoding.

On NVIDIA GPUs (Platform.supports_wan_vae_walk) each chunk goes through wan_vae_walk (the decoder walked
with its own weights: channels last, fused RMS norm + SiLU, no cat/pad copies); elsewhere through
diffusers' own modules, bit for bit.
Measured on an H100 (benchmarks/RESULTS.md, "Wan VAE decode"; Wan2.1, 81 frames of 480x832, bf16): whole
frames (tiles=1, the default) 773 ms against diffusers' 2,071, peak 4.2 GB (diffusers: 4.6 GB), and closer
to a float32 decode than diffusers' bf16 one (1.4e-2 vs 2.0e-2). Strips are for frames far larger than
480p: at 480p tiles=2 saves no memory and costs 25% more time.

The Wan pipeline calls `decode_wan_latents(vae, latents)` where it called `vae.decode(latents).sample`.
Decoders this does not cover (Wan2.2's residual decoder, patchified VAEs) fall back to vae.decode.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from diffserve.platforms import get_current_platform
from diffserve.runtime.wan_vae_walk import WanWalk, walk_supported

# diffusers' causal-cache protocol: each causal conv keeps the last CACHE_T frames of its input.
CACHE_T = 2


def receptive_halo(decoder: nn.Module) -> int:
    """Latent columns a back-part output column depends on, each side: the spatial padding of every
    convolution after the middle block, divided by the upsampling factor reached where it runs."""
    scale, halo = 1.0, 0.0
    for block in decoder.up_blocks:
        for m in block.modules():
            if isinstance(m, nn.Upsample):
                factor = m.scale_factor
                scale *= factor[-1] if isinstance(factor, tuple) else factor
            elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
                halo += (m.kernel_size[-1] // 2) / scale
    halo += (decoder.conv_out.kernel_size[-1] // 2) / scale
    return math.ceil(halo)


def _supported(vae) -> bool:
    cfg = vae.config
    return not getattr(cfg, "is_residual", False) and getattr(cfg, "patch_size", None) is None


def _cache_for(module: nn.Module) -> list:
    # One slot per causal conv (and per temporal upsampler's marker); the module count bounds both.
    return [None] * sum(1 for _ in module.modules())


def _causal_conv(conv: nn.Module, x: torch.Tensor, cache: list, idx: list) -> torch.Tensor:
    """Run a causal conv on a chunk, with the previous chunk's frames from cache[idx[0]], and update it."""
    i = idx[0]
    tail = x[:, :, -CACHE_T:].clone()
    if tail.shape[2] < CACHE_T and cache[i] is not None:
        tail = torch.cat([cache[i][:, :, -1:].to(tail.device), tail], dim=2)
    out = conv(x, cache[i])
    cache[i] = tail
    idx[0] += 1
    return out


def _front(decoder, x: torch.Tensor, cache: list) -> torch.Tensor:
    idx = [0]
    x = _causal_conv(decoder.conv_in, x, cache, idx)
    return decoder.mid_block(x, feat_cache=cache, feat_idx=idx)


def _back(decoder, x: torch.Tensor, cache: list, first: bool) -> torch.Tensor:
    idx = [0]
    for block in decoder.up_blocks:
        x = block(x, feat_cache=cache, feat_idx=idx, first_chunk=first)
    x = decoder.nonlinearity(decoder.norm_out(x))
    return _causal_conv(decoder.conv_out, x, cache, idx)


class _ModuleStream:
    """One stream of chunks through diffusers' own modules, with their feat_cache protocol."""

    def __init__(self, decoder: nn.Module):
        self.decoder, self.cache, self.first = decoder, _cache_for(decoder), True

    def front(self, z: torch.Tensor) -> torch.Tensor:
        return _front(self.decoder, z, self.cache)

    def back(self, x: torch.Tensor) -> torch.Tensor:
        out = _back(self.decoder, x, self.cache, self.first)
        self.first = False
        return out


def _walk_on(latents: torch.Tensor) -> bool:
    """Whether the decode takes wan_vae_walk (channels last, fused norms) rather than the modules: on the
    GPUs of a platform that supports the walk (Platform.supports_wan_vae_walk: NVIDIA's; on AMD GPUs, whose
    ROCm builds also report "cuda" tensors, the walk's channels-last 3D convolutions were never measured).
    On the CPU the result stays bit-identical to vae.decode. (A function so that the CPU tests can run the
    walk.)"""
    return latents.is_cuda and get_current_platform().supports_wan_vae_walk()


def chunks(frames: int, size: int) -> list[tuple[int, int]]:
    """[start, end) latent frames per decoder call: the first frame alone, then `size` at a time."""
    return [(0, 1)] + [(f, min(f + size, frames)) for f in range(1, frames, size)]


def strips(width: int, tiles: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(core start, core end, padded start, padded end) latent columns of `tiles` strips."""
    bounds = [round(i * width / tiles) for i in range(tiles + 1)]
    return [
        (a, b, max(0, a - halo), min(width, b + halo))
        for a, b in zip(bounds, bounds[1:], strict=False)
        if b > a
    ]


@torch.inference_mode()
def decode_wan_latents(
    vae, latents: torch.Tensor, tiles: int = 1, halo: int | None = None, frames_at_once: int = 1
) -> torch.Tensor:
    """latents (batch, z_dim, frames, h, w), un-normalised as vae.decode takes them -> video
    (batch, 3, 1 + 4 * (frames - 1), 8h, 8w) in [-1, 1], in vae's dtype: vae.decode(latents).sample.

    tiles: vertical strips for the high-resolution part (1: whole frames). halo: latent columns added to
    each side of a strip (default: the decoder's receptive field, which makes strips exact). frames_at_once:
    latent frames per decoder call after the first (which the decoder always takes alone); the causal
    convolutions give the same result for any split, up to summation order (1: as diffusers)."""
    if not _supported(vae):
        return vae.decode(latents, return_dict=False)[0]
    decoder = vae.decoder
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    batch, _, frames, h, w = latents.shape
    halo = receptive_halo(decoder) if halo is None else halo
    spans = strips(w, max(1, min(tiles, w)), halo)
    if _walk_on(latents) and walk_supported(decoder):
        stream = functools.partial(WanWalk, decoder, {})  # (the walks of one decode share their weights)
    else:
        stream = functools.partial(_ModuleStream, decoder)

    out = None
    for b in range(batch):  # one video at a time, as diffusers' sliced decoding: the caches are per video
        z = vae.post_quant_conv(latents[b : b + 1])
        front = stream()
        backs = [stream() for _ in spans]
        t = 0
        for f, g in chunks(frames, max(1, frames_at_once)):
            feat = front.front(z[:, :, f:g])
            for (a, e, lo, hi), back in zip(spans, backs, strict=True):
                chunk = back.back(feat[..., lo:hi])
                scale = chunk.shape[-1] // (hi - lo)
                if out is None:  # (the first chunk is one latent frame: one video frame)
                    total = 1 + (frames - 1) * _frames_per_chunk(vae)
                    out = chunk.new_empty(batch, chunk.shape[1], total, chunk.shape[3], w * scale)
                n = chunk.shape[2]
                core = chunk[..., (a - lo) * scale : (e - lo) * scale]
                out[b : b + 1, :, t : t + n, :, a * scale : e * scale] = core.clamp(-1.0, 1.0)
                del chunk, core
            t += n
            del feat
    return out


def _frames_per_chunk(vae) -> int:
    return getattr(vae.config, "scale_factor_temporal", None) or 2 ** sum(vae.temperal_downsample)
