"""AutoencoderKL decoding with each GroupNorm -> SiLU pair as one fused op: vae.decode's numbers, faster.

The decoder of an AutoencoderKL (FLUX, SD3, our bundled model) is mostly GroupNorm -> SiLU -> 3x3 conv.
PyTorch's GroupNorm underfills the GPU at batch 1 (one thread block per sample and group: 32 blocks on a
132-SM H100, ~46 of the 91 ms of a FLUX 1024x1024 decode), and the SiLU after it is another pass over
the activation. Here the decoder is walked with its own modules and weights, in diffusers' order, but
every norm + activation pair is one diffserve.kernels.group_norm(..., silu=True) call:

  ResnetBlock2D: norm1 -> SiLU, conv1, norm2 -> SiLU, dropout, conv2, + shortcut, / output_scale_factor
  Decoder:       post_quant_conv (if any), conv_in, mid block (resnet, [attention, resnet]...),
                 up blocks (resnets, then upsamplers), conv_norm_out -> SiLU, conv_out

Convolutions, the mid block's attention and the upsamplers are called as they are. On the CPU (and
wherever the kernel does not run) group_norm is F.group_norm then F.silu, so the result is bit-identical
to vae.decode; on CUDA it differs by the kernel's single rounding (one bf16 ulp per element).

Memory format on CUDA: the latents are made channels_last once and the whole decoder runs in it. Under
vae.decode the stream is NCHW until the mid block's attention, whose output (a transposed view) is
channels_last, so from then on every resnet added a channels_last tensor to an NCHW one (a strided,
unvectorised loop: ~5x a plain add) and cuDNN transposed every conv's input and output to NHWC and back
(~15 of 42 ms of a FLUX 1024x1024 decode on an H100). In channels_last, cuDNN runs its NHWC kernels directly (an NCHW weight is
converted per call: small), group_norm reads and writes channels_last natively, the attention keeps it
(its input reshapes to tokens as a view, its output comes back channels_last) and so do nearest-neighbour
upsampling and the 1x1 shortcuts; both operands of every residual add are channels_last. The 3-channel
image is made contiguous at the end (cheap). On the CPU the latents keep their layout, as vae.decode's.

The VAE is never modified: benchmarks share it with diffusers' own pipeline. Anything not recognised —
another VAE or decoder class, resnets with a time embedding, up/down sampling or another activation,
spatial norms, slicing or tiling switched on, accelerate/diffusers hooks (offloading) on a module we
would step around — decodes through vae.decode for the whole call. The structure is checked once per
VAE; the switches and hooks, which can change between calls, at every call.

Call: decode_kl_latents(vae, latents) where the pipeline called vae.decode(latents, return_dict=False)[0].
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from diffserve.kernels.group_norm import group_norm

# vae -> (decoder it was checked with, post_quant_conv it was checked with, the modules whose forward the
# walk replaces — None when the VAE is not supported). Weak keys: a VAE that goes away drops its entry.
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_silu_ok(norm: nn.Module, act: nn.Module) -> bool:
    return type(norm) is nn.GroupNorm and type(act) is nn.SiLU


def _resnet_ok(block: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return (
        type(block) is ResnetBlock2D
        and _norm_silu_ok(block.norm1, block.nonlinearity)
        and _norm_silu_ok(block.norm2, block.nonlinearity)
        and block.upsample is None
        and block.downsample is None
        and block.time_emb_proj is None
        # Without a time embedding every mode but scale_shift (which needs one) is norm2 alone; the
        # Decoder's up blocks say "group", its mid block "default".
        and block.time_embedding_norm != "scale_shift"
    )


def _replaced_modules(vae) -> list[nn.Module] | None:
    """The decoder modules whose forward the walk stands in for (their children are called as they are),
    or None when some part of the VAE is not the structure the walk reproduces. (Not the VAE itself: the
    cache's values must not hold their weak key alive.)"""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D

    if type(vae) is not AutoencoderKL or type(vae.decoder) is not Decoder:
        return None
    decoder = vae.decoder
    mid = decoder.mid_block
    if type(mid) is not UNetMidBlock2D or len(mid.resnets) != len(mid.attentions) + 1:
        return None
    if any(type(block) is not UpDecoderBlock2D for block in decoder.up_blocks):
        return None
    resnets = [*mid.resnets, *(r for block in decoder.up_blocks for r in block.resnets)]
    if not all(_resnet_ok(r) for r in resnets):
        return None
    if not _norm_silu_ok(decoder.conv_norm_out, decoder.conv_act):
        return None
    replaced = [decoder, mid, *decoder.up_blocks, decoder.conv_norm_out, decoder.conv_act]
    for r in resnets:
        replaced += [r, r.norm1, r.norm2, r.nonlinearity]
    return replaced


def _has_hooks(module: nn.Module) -> bool:
    # torch hooks, accelerate's (offloading, device maps) and diffusers' (group offloading, caches): a
    # module we step around would not get them.
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hasattr(module, "_hf_hook")
        or hasattr(module, "_diffusers_hook")
    )


def _plan(vae) -> list[nn.Module] | None:
    """The replaced modules if the walk may decode this VAE now, else None."""
    decoder, post_quant_conv = getattr(vae, "decoder", None), getattr(vae, "post_quant_conv", None)
    cached = _plans.get(vae)
    if cached is None or cached[0] is not decoder or cached[1] is not post_quant_conv:
        cached = (decoder, post_quant_conv, _replaced_modules(vae))
        _plans[vae] = cached
    replaced = cached[2]
    if replaced is None or vae.use_slicing or vae.use_tiling or _has_hooks(vae):
        return None
    if any(_has_hooks(m) for m in replaced):
        return None
    return replaced


def vae_decode_supported(vae) -> bool:
    """Whether decode_kl_latents takes the fused path for this VAE (else it calls vae.decode)."""
    return isinstance(vae, nn.Module) and _plan(vae) is not None


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True)


def _resnet(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = block.conv1(_norm_silu(block.norm1, x))
    h = block.conv2(block.dropout(_norm_silu(block.norm2, h)))
    shortcut = x if block.conv_shortcut is None else block.conv_shortcut(x)
    out = shortcut + h
    # x / 1.0 == x exactly: skip a pass over the activation for the factor every AutoencoderKL uses.
    return out if block.output_scale_factor == 1.0 else out / block.output_scale_factor


def _channels_last_decode(latents: torch.Tensor) -> bool:
    # CUDA only: on the CPU the result must stay bit-identical to vae.decode, and oneDNN's channels_last
    # convolutions may round differently. (A function so that the CPU tests can run the CUDA layout.)
    return latents.is_cuda


@torch.inference_mode()
def decode_kl_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """latents (batch, latent_channels, h, w), un-normalised as vae.decode takes them -> images
    (batch, out_channels, H, W): vae.decode(latents, return_dict=False)[0]."""
    if not vae_decode_supported(vae):
        return vae.decode(latents, return_dict=False)[0]
    decoder = vae.decoder
    channels_last = _channels_last_decode(latents)
    if channels_last:
        latents = latents.contiguous(memory_format=torch.channels_last)
    z = latents if vae.post_quant_conv is None else vae.post_quant_conv(latents)
    h = decoder.conv_in(z)
    mid = decoder.mid_block
    h = _resnet(mid.resnets[0], h)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            h = attn(h, temb=None)
        h = _resnet(resnet, h)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            h = _resnet(resnet, h)
        for upsampler in block.upsamplers or ():
            h = upsampler(h)
    image = decoder.conv_out(_norm_silu(decoder.conv_norm_out, h))
    return image.contiguous() if channels_last else image
