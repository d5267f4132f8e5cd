"""AutoencoderKL decoding with each GroupNorm -> SiLU pair as one fused op: vae.decode's numbers, faster.

The decoder of an AutoencoderKL (FLUX, SD3, our bundled model) is mostly GroupNorm -> SiLU -> 3x3 conv.
PyTorch's GroupNorm underfills the GPU at batch 1 (one thread block per sample and group: 32 blocks on a
132-SM H100, ~46 of the 91 ms of a FLUX 1024x1024 decode), and the SiLU after it is another pass over
the activation. Here the decoder is walked with its own modules and weights, in diffusers' order, but
every norm + activation pair is one diffserve.kernels.group_norm(..., silu=True) call:

  ResnetBlock2D: norm1 -> SiLU, conv1, norm2 -> SiLU, dropout, conv2, + shortcut, / output_scale_factor
  Decoder:       post_quant_conv (if any), conv_in, mid block (resnet, [attention, resnet]...),
                 up blocks (resnets, then upsamplers), conv_norm_out -> SiLU, conv_out

On the CPU the convolutions, the mid block's attention and the upsamplers are called as they are, and
group_norm is F.group_norm then F.silu, so the result is bit-identical to vae.decode.

On CUDA the convolutions run without their bias (F.conv2d with the module's weight and geometry): a
biased nn.Conv2d there is cuDNN then a separate broadcast add of the bias, a strided loop at ~1/3 of the
bandwidth (6.4 of 36 ms of a FLUX 1024x1024 decode on an H100). The bias is added by the next pass over
the output instead: the GroupNorm after conv1 and after conv_in (group_norm's input_bias), the residual
add after conv2 and the 1x1 shortcut (one Triton pass a + b + bias + bias2); only conv_out's and some
upsamplers' outputs (a resnet's 1x1 shortcut needs x + bias itself) get a plain, vectorised bias add.
The upsamplers' nearest 2x is a Triton copy in channels_last (PyTorch's NHWC kernel is a gather loop at
3x its NCHW time). Every sum is taken in float32 and rounded once, where diffusers on CUDA rounds the conv
output, then the biased one: the result stays within bf16 rounding of vae.decode's.

Memory format on CUDA: the latents are made channels_last once and the whole decoder runs in it. Under
vae.decode the stream is NCHW until the mid block's attention, whose output (a transposed view) is
channels_last, so from then on every resnet added a channels_last tensor to an NCHW one (a strided,
unvectorised loop: ~5x a plain add) and cuDNN transposed every conv's input and output to NHWC and back
(~15 of 42 ms of a FLUX 1024x1024 decode on an H100). In channels_last, cuDNN runs its NHWC kernels
directly (an NCHW weight is converted per call: small), group_norm reads and writes channels_last natively, the attention keeps it
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
import torch.nn.functional as F
from torch import nn

from diffserve.kernels.bias_add import add as _add
from diffserve.kernels.bias_add import upsample_nearest2x
from diffserve.kernels.group_norm import group_norm
from diffserve.platforms import get_current_platform
from diffserve.runtime.models.base import has_hooks

# vae -> (decoder it was checked with, post_quant_conv it was checked with, the modules whose forward the
# walk replaces — None when the VAE is not supported). Weak keys: a VAE that goes away drops its entry.
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _norm_silu_ok(norm: nn.Module, act: nn.Module) -> bool:
    return type(norm) is nn.GroupNorm and type(act) is nn.SiLU


def _conv_ok(conv: nn.Module | None) -> bool:
    # What F.conv2d(x, conv.weight, None, ...) reproduces (other padding modes pad first).
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros"


def _upsampler_ok(up: nn.Module) -> bool:
    from diffusers.models.upsampling import Upsample2D

    return (
        type(up) is Upsample2D
        and up.norm is None
        and up.interpolate
        and up.use_conv
        and not up.use_conv_transpose
        and up.name == "conv"
        and _conv_ok(up.conv)
    )


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
        and _conv_ok(block.conv1)
        and _conv_ok(block.conv2)
        and (block.conv_shortcut is None or _conv_ok(block.conv_shortcut))
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
    upsamplers = [u for block in decoder.up_blocks for u in block.upsamplers or ()]
    if not all(_upsampler_ok(u) for u in upsamplers) or not all(
        _conv_ok(c) for c in (decoder.conv_in, decoder.conv_out)
    ):
        return None
    # On CUDA the convolutions and upsamplers are not called as modules either (their bias is folded).
    replaced = [decoder, mid, *decoder.up_blocks, decoder.conv_norm_out, decoder.conv_act]
    replaced += [decoder.conv_in, decoder.conv_out, *upsamplers, *(u.conv for u in upsamplers)]
    for r in resnets:
        replaced += [r, r.norm1, r.norm2, r.nonlinearity, r.conv1, r.conv2]
        replaced += [r.conv_shortcut] if r.conv_shortcut is not None else []
    return replaced


def _plan(vae) -> list[nn.Module] | None:
    """The replaced modules if the walk may decode this VAE now, else None."""
    decoder, post_quant_conv = getattr(vae, "decoder", None), getattr(vae, "post_quant_conv", None)
    cached = _plans.get(vae)
    if cached is None or cached[0] is not decoder or cached[1] is not post_quant_conv:
        cached = (decoder, post_quant_conv, _replaced_modules(vae))
        _plans[vae] = cached
    replaced = cached[2]
    if replaced is None or vae.use_slicing or vae.use_tiling or has_hooks(vae):
        return None
    if any(has_hooks(m) for m in replaced):
        return None
    return replaced


def vae_decode_supported(vae) -> bool:
    """Whether decode_kl_latents takes the fused path for this VAE (else it calls vae.decode)."""
    return isinstance(vae, nn.Module) and _plan(vae) is not None


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, x_bias: torch.Tensor | None) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True, input_bias=x_bias)


# On CUDA (fold=True) activations travel as (x, x_bias): the tensor a conv wrote without its bias, and that
# bias (or None), still to be added. The pass that next reads x adds it — the GroupNorm after the conv
# (input_bias) or the residual add — so no pass exists only to add a bias. On the CPU (fold=False) every
# conv is the module itself and x_bias is always None: vae.decode's exact operations.


def _conv(conv: nn.Conv2d, x: torch.Tensor, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not fold or conv.bias is None:
        return conv(x), None
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups), conv.bias


def _resnet(block: nn.Module, x: torch.Tensor, x_bias: torch.Tensor | None, fold: bool) -> torch.Tensor:
    if x_bias is not None and block.conv_shortcut is not None:
        x, x_bias = _add(x, bias=x_bias), None  # the 1x1 shortcut conv needs x + x_bias itself
    h, h_bias = _conv(block.conv1, _norm_silu(block.norm1, x, x_bias), fold)
    h, h_bias = _conv(block.conv2, block.dropout(_norm_silu(block.norm2, h, h_bias)), fold)
    shortcut, s_bias = (x, x_bias) if block.conv_shortcut is None else _conv(block.conv_shortcut, x, fold)
    out = _add(shortcut, h, s_bias, h_bias)  # shortcut + conv2(...): both biases in the one pass
    # x / 1.0 == x exactly: skip a pass over the activation for the factor every AutoencoderKL uses.
    return out if block.output_scale_factor == 1.0 else out / block.output_scale_factor


def _upsample(up: nn.Module, x: torch.Tensor, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not fold:
        return up(x), None
    return _conv(up.conv, upsample_nearest2x(x), fold)  # Upsample2D.forward: nearest 2x, then its conv


def _cuda_walk(latents: torch.Tensor) -> bool:
    """The CUDA form of the walk: channels_last throughout, conv biases folded into the next pass (the
    Triton group norms and adds). On the GPUs of a platform that runs our Triton kernels
    (Platform.supports_triton_kernels: NVIDIA's and AMD's) only: on the CPU the result must stay
    bit-identical to vae.decode, and oneDNN's channels_last convolutions may round differently. (A function
    so that the CPU tests can run the CUDA form.)"""
    return latents.is_cuda and get_current_platform().supports_triton_kernels()


@torch.inference_mode()
def decode_kl_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """latents (batch, latent_channels, h, w), un-normalised as vae.decode takes them -> images
    (batch, out_channels, H, W): vae.decode(latents, return_dict=False)[0]."""
    if not vae_decode_supported(vae):
        return vae.decode(latents, return_dict=False)[0]
    decoder = vae.decoder
    fold = _cuda_walk(latents)
    if fold:
        latents = latents.contiguous(memory_format=torch.channels_last)
    # post_quant_conv (1x1 on the latents: small) as it is, since conv_in's zero padding needs its bias.
    z = latents if vae.post_quant_conv is None else vae.post_quant_conv(latents)
    h, h_bias = _conv(decoder.conv_in, z, fold)
    mid = decoder.mid_block
    h = _resnet(mid.resnets[0], h, h_bias, fold)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            h = attn(h, temb=None)
        h = _resnet(resnet, h, None, fold)
    h_bias = None
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            h, h_bias = _resnet(resnet, h, h_bias, fold), None
        for upsampler in block.upsamplers or ():
            if h_bias is not None:  # (two upsamplers in a row: never in diffusers' blocks)
                h, h_bias = _add(h, bias=h_bias), None
            h, h_bias = _upsample(upsampler, h, fold)
    image, image_bias = _conv(decoder.conv_out, _norm_silu(decoder.conv_norm_out, h, h_bias), fold)
    image = _add(image, bias=image_bias)
    return image.contiguous() if fold else image
