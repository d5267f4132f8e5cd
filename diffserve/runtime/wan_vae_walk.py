"""The Wan2.1 VAE decoder walked with its own weights on CUDA: channels last, fused norms, no pad copies.

vae_decode.decode_wan_latents runs AutoencoderKLWan's decoder one latent frame at a time. Through the
modules, each step of an 81-frame 480x832 decode (2.07 s on an H100, benchmarks/RESULTS.md) spent more
time moving memory than convolving:
  * every causal 3D conv concatenates its cached frames to its input (torch.cat) and zero-pads the result
    in space (F.pad): two copies of its input;
  * cuDNN gets NCDHW tensors and transposes each conv's input to NDHWC and its output back (0.21 s);
  * WanRMS_norm is eight elementwise passes and SiLU a ninth (~0.6 s);
  * the biased convs add their bias in a separate broadcast pass.
Here (same order of operations as diffusers, same weights, the modules are not modified):
  * activations are channels_last_3d from start to end: cuDNN runs its NDHWC kernels directly (1.2-1.4x
    faster at these shapes) and a frame batch (T, C, H, W) is a free view for the 2D upsampling convs;
  * each causal conv reads one buffer [history | new frames]: its last two input frames are kept per conv
    (the state diffusers keeps in feat_cache), copied to the head of the next buffer, and the producer
    (a fused norm, or a copy at the low-resolution ends) writes the new frames straight after them; the
    spatial zero padding is the convolution's own;
  * RMS norm + SiLU is one pass (kernels.channel_rms_norm), which also adds the producing conv's bias;
  * convs run without bias; the bias rides to the next pass over their output (the norm, or the residual
    add, one Triton pass for a + b + both biases: kernels.bias_add).

Causal history, as diffusers keeps it: a conv's input stream starts with two zero frames, the first chunk
included; the temporal upsampler's conv skips the first chunk altogether (diffusers' "Rep" marker) and
starts from zeros at the second.

Numerics: in float32 this is vae.decode up to summation order (tests on the CPU). In bf16 the norms round
as WanRMS_norm does; the differences are cuDNN's other kernels and the biases added in float32 with one
rounding (GPU tests hold it to vae.decode within bf16 tolerance). Decoders this does not reproduce
(Wan2.2's residual up blocks, patchified VAEs, other activations, hooks on a module it steps around) take
the module path in vae_decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.kernels.bias_add import add, upsample_nearest2x
from diffserve.kernels.channel_rms_norm import channel_rms_norm
from diffserve.runtime.models.base import has_hooks

_CL3 = torch.channels_last_3d

# cuDNN's Hopper convolution kernels take input channels in multiples of 64: at Wan2.1's 96 (the
# full-resolution stage) it runs an sm80 kernel at 245 TFLOP/s; with the input padded to 128 zero-filled
# channels (and zero weights for them) the same 3x3x3 conv takes 1.85 instead of 3.25 ms (573 TFLOP/s of
# useful work, H100, 4 frames of 480x832). Padded only where the conv has at least that many outputs:
# the 3-channel conv_out runs slower padded (1.24 -> 1.61 ms).
CHANNEL_MULTIPLE = 64


def padded_channels(conv: nn.Module) -> int:
    """The input channels the walk gives a norm-fed conv: its own, or rounded up to CHANNEL_MULTIPLE."""
    c, m = conv.in_channels, CHANNEL_MULTIPLE
    return -(-c // m) * m if c % m and conv.out_channels >= m else c


def walk_supported(decoder: nn.Module) -> bool:
    """Whether WanWalk reproduces this decoder (Wan2.1's layout, SiLU everywhere, no hooks)."""
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    if type(decoder) is not wan.WanDecoder3d or not isinstance(decoder.nonlinearity, nn.SiLU):
        return False
    mid = decoder.mid_block
    if type(mid) is not wan.WanMidBlock or len(mid.resnets) != len(mid.attentions) + 1:
        return False
    if any(type(block) is not wan.WanUpBlock for block in decoder.up_blocks):
        return False
    resnets = [*mid.resnets, *(r for block in decoder.up_blocks for r in block.resnets)]
    norms = [decoder.norm_out, *(n for r in resnets for n in (r.norm1, r.norm2))]
    if any(type(r) is not wan.WanResidualBlock or not isinstance(r.nonlinearity, nn.SiLU) for r in resnets):
        return False
    if any(not n.channel_first or n.gamma.dim() != 4 for n in norms):  # images=False: (C, 1, 1, 1)
        return False
    for block in decoder.up_blocks:
        for up in block.upsamplers or ():
            if up.mode not in ("upsample2d", "upsample3d"):
                return False
    # The attention blocks are called as modules; everything else is stepped around.
    return not any(has_hooks(m) for m in decoder.modules() if type(m) is not wan.WanAttentionBlock)


class WanWalk:
    """One stream of chunks (a video, or one strip of it) through the decoder; holds each causal conv's
    last input frames between chunks. front() runs conv_in + the middle block on latent frames, back()
    the up blocks and the head, as vae_decode splits the decoder."""

    def __init__(self, decoder: nn.Module, weights: dict | None = None):
        self.decoder = decoder
        self.history: dict[nn.Module, torch.Tensor] = {}
        # Conv weights in channels_last_3d, shared by the walks of one decode (cuDNN would convert an
        # NCDHW weight at every call).
        self.weights = {} if weights is None else weights

    def _weight(self, conv: nn.Module, in_channels: int | None = None) -> torch.Tensor:
        w = self.weights.get(conv)
        if w is None:
            fmt = _CL3 if conv.weight.dim() == 5 else torch.channels_last
            w = conv.weight
            if in_channels is not None and in_channels > w.shape[1]:  # zero weights for the zero channels
                w = torch.cat([w, w.new_zeros(w.shape[0], in_channels - w.shape[1], *w.shape[2:])], dim=1)
            w = self.weights[conv] = w.contiguous(memory_format=fmt)
        return w

    def _causal(self, conv: nn.Module, n: int, size: tuple[int, int], fill, channels: int | None = None):
        """conv over [its last input frames | n new frames], without bias; fill(view) writes the new frames
        into the buffer's tail. size: (height, width) of the input; channels: the buffer's (the conv's
        input channels, or more: zero padding that fill writes)."""
        pad_w, _, pad_h, _, pad_t, _ = conv._padding  # (2 * temporal padding frames of history)
        channels = channels or conv.in_channels
        w = self._weight(conv, channels)
        buf = torch.empty((1, channels, pad_t + n, *size), device=w.device, dtype=w.dtype, memory_format=_CL3)
        history = self.history.get(conv)
        if pad_t:
            if history is None:
                buf[:, :, :pad_t].zero_()
            else:
                buf[:, :, :pad_t].copy_(history)
        fill(buf[:, :, pad_t:])
        if pad_t:
            tail = buf[:, :, -pad_t:]
            if history is None:
                self.history[conv] = tail.clone(memory_format=_CL3)
            else:
                history.copy_(tail)
        return F.conv3d(buf, w, None, conv.stride, (0, pad_h, pad_w))

    def _norm_conv(self, norm: nn.Module, conv: nn.Module, x: torch.Tensor, x_bias) -> torch.Tensor:
        """conv(SiLU(norm(x + x_bias))), the norm written straight into the conv's buffer (with its padding
        channels, if any)."""
        bias = norm.bias if isinstance(norm.bias, torch.Tensor) else None  # (a float 0.0 when absent)
        return self._causal(
            conv,
            x.shape[2],
            x.shape[3:],
            lambda out: channel_rms_norm(x, norm.gamma, norm.scale, bias, True, x_bias, out=out),
            padded_channels(conv),
        )

    def _resnet(self, block: nn.Module, x: torch.Tensor, x_bias) -> torch.Tensor:
        if isinstance(block.conv_shortcut, nn.Identity):
            shortcut, s_bias = x, x_bias
        else:
            x, x_bias = add(x, bias=x_bias), None  # the 1x1 shortcut needs x + its bias itself
            s = block.conv_shortcut
            shortcut, s_bias = F.conv3d(x, self._weight(s), None, s.stride), s.bias
        h = self._norm_conv(block.norm1, block.conv1, x, x_bias)
        h = self._norm_conv(block.norm2, block.conv2, h, block.conv1.bias)  # (dropout: eval, identity)
        return add(h, shortcut, block.conv2.bias, s_bias)

    def _upsample(self, up: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if up.mode == "upsample3d":
            tconv = up.time_conv
            if tconv not in self.history:
                # First chunk: diffusers marks the cache "Rep" and leaves the frames as they are; the
                # conv's history then starts from zeros.
                shape = (*x.shape[:2], tconv._padding[4], *x.shape[3:])
                self.history[tconv] = x.new_zeros(shape).contiguous(memory_format=_CL3)
            else:
                y = add(
                    self._causal(tconv, x.shape[2], x.shape[3:], lambda out: out.copy_(x)), bias=tconv.bias
                )
                # (1, 2C, n, H, W) -> (1, C, 2n, H, W): frame 2t is channels [0, C) of y's frame t, 2t+1
                # the rest.
                _, c2, n, h, w = y.shape
                frames = y.permute(0, 2, 3, 4, 1).reshape(1, n, h, w, 2, c2 // 2).permute(0, 1, 4, 2, 3, 5)
                x = frames.reshape(1, 2 * n, h, w, c2 // 2).permute(0, 4, 1, 2, 3)
        conv = up.resample[1]
        frames = upsample_nearest2x(x[0].transpose(0, 1))  # (T, C, H, W) channels_last: a view
        y = F.conv2d(frames, self._weight(conv), None, conv.stride, conv.padding)
        return y.transpose(0, 1).unsqueeze(0), conv.bias

    def front(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in and the middle block on latent frames (1, z_dim, n, h, w)."""
        d = self.decoder
        x = self._causal(d.conv_in, z.shape[2], z.shape[3:], lambda out: out.copy_(z))
        mid = d.mid_block
        x = self._resnet(mid.resnets[0], x, d.conv_in.bias)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
            x = self._resnet(resnet, attn(x).contiguous(memory_format=_CL3), None)
        return x

    def back(self, x: torch.Tensor) -> torch.Tensor:
        """The up blocks and the head on the middle block's output: video frames (1, 3, n, H, W)."""
        d = self.decoder
        x, x_bias = x.contiguous(memory_format=_CL3), None  # (a strip of the frame is a strided view)
        for block in d.up_blocks:
            for resnet in block.resnets:
                x, x_bias = self._resnet(resnet, x, x_bias), None
            for up in block.upsamplers or ():
                x, x_bias = self._upsample(up, x)
        return add(self._norm_conv(d.norm_out, d.conv_out, x, x_bias), bias=d.conv_out.bias)
