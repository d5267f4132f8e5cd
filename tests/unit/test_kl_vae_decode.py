"""diffserve.runtime.kl_vae_decode against AutoencoderKL.decode.

On the CPU the walk calls the VAE's own convolutions and group_norm is F.group_norm then F.silu, so the
result must equal vae.decode bit for bit; the CUDA form of the walk (channels_last, conv biases folded into
the next pass) is run on the CPU with torch's ops and on the GPU with the Triton kernels. The kernels
themselves are tested in test_kl_vae_kernels.py.
"""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
from torch import nn

from diffserve.kernels import group_norm as gn
from diffserve.runtime import kl_vae_decode as kl
from diffserve.runtime.kl_vae_decode import decode_kl_latents, vae_decode_supported
from tests.unit.gpu_helpers import needs_cuda_triton, rel_err

CL = torch.channels_last


def _randomise(model: nn.Module) -> nn.Module:
    # Every weight random (norm weights start at one, biases at zero), so each one matters.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _tiny_vae(latent_channels=16, groups=16, post_quant_conv=True, up=("UpDecoderBlock2D",) * 2, act="silu"):
    return _randomise(
        diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=up,
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=groups,
            act_fn=act,
            sample_size=16,  # tiles of 8 latents once tiling is on
            use_post_quant_conv=post_quant_conv,
        )
    )


def _latents(batch: int, channels: int, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(batch))


def _decode(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z, return_dict=False)[0]


# ---------------------------------------------------------------- decode_kl_latents on the CPU


@pytest.fixture(scope="module")
def vae():
    return _tiny_vae(latent_channels=16, groups=16, post_quant_conv=True)


@pytest.fixture(scope="module")
def vae_no_pqc():
    return _tiny_vae(latent_channels=4, groups=8, post_quant_conv=False)


def _snapshot(vae) -> tuple:
    return (
        {k: v.clone() for k, v in vae.state_dict().items()},
        [(name, type(m), id(m), m.training) for name, m in vae.named_modules()],
        (vae.use_slicing, vae.use_tiling),
    )


def _same(a: tuple, b: tuple) -> bool:
    (sa, ma, fa), (sb, mb, fb) = a, b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and ma == mb and fa == fb


@pytest.mark.parametrize("which", ["vae", "vae_no_pqc"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_equals_vae_decode_bitwise(request, monkeypatch, which, batch):
    model = request.getfixturevalue(which)
    assert (model.post_quant_conv is not None) == (which == "vae")
    z = _latents(batch, model.config.latent_channels)
    expected = _decode(model, z)
    before = _snapshot(model)

    calls = []

    def counting(x, *args, silu=False, input_bias=None):
        calls.append((silu, input_bias))
        return gn.group_norm(x, *args, silu=silu, input_bias=input_bias)

    monkeypatch.setattr(kl, "group_norm", counting)
    assert vae_decode_supported(model)
    got = decode_kl_latents(model, z)

    assert got.shape == (batch, 3, 16, 16) and got.dtype == expected.dtype
    assert torch.equal(got, expected)
    # The fused path really ran: one norm+SiLU per resnet norm (mid: 2 resnets, up: 2 x 2) and the head.
    n_resnets = len(model.decoder.mid_block.resnets) + sum(len(b.resnets) for b in model.decoder.up_blocks)
    assert calls == [(True, None)] * (2 * n_resnets + 1)  # (no bias folded on the CPU)
    assert _same(before, _snapshot(model))  # weights, modules and switches untouched


def test_post_quant_conv_is_applied(vae):
    # Were it skipped, the output would not change when it goes: the VAE's own conv is in the path. The
    # same VAE object, decoded before, is checked anew once its post_quant_conv is replaced.
    model = copy.deepcopy(vae)
    z = _latents(1, 16)
    with_conv = decode_kl_latents(model, z)
    model.post_quant_conv = None
    without = decode_kl_latents(model, z)
    assert not torch.equal(with_conv, without)
    assert torch.equal(without, _decode(model, z))


def _record_convs(monkeypatch) -> list[tuple[bool, bool]]:
    """Wraps the walk's conv step (the decoder's convolutions but post_quant_conv), recording whether each
    input is channels_last and whether the conv's bias was left to the next pass."""
    seen, conv = [], kl._conv

    def recording(module, x, fold):
        out, bias = conv(module, x, fold)
        seen.append((x.is_contiguous(memory_format=CL), bias is not None))
        return out, bias

    monkeypatch.setattr(kl, "_conv", recording)
    return seen


def _decoder_convs(model) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.decoder.modules())


def test_cpu_decode_keeps_the_latents_layout_and_biased_convs(vae, monkeypatch):
    seen = _record_convs(monkeypatch)
    decode_kl_latents(vae, _latents(1, 16))
    upsamplers = sum(len(b.upsamplers or ()) for b in vae.decoder.up_blocks)
    assert len(seen) == _decoder_convs(vae) - upsamplers  # (the upsamplers run as modules, conv inside)
    assert not seen[0][0]  # conv_in's input: NCHW on the CPU, as under vae.decode
    assert not any(folded for _, folded in seen)  # the modules themselves, biases included


def test_cuda_walk_on_the_cpu(vae, monkeypatch):
    # The CUDA form (latents made channels_last, convs without bias, the biases added by the next
    # GroupNorm or residual add, image made contiguous) run on the CPU with torch's ops: every conv and
    # every residual add sees channels_last, and the numbers are vae.decode's up to float32 rounding.
    model = copy.deepcopy(vae)
    monkeypatch.setattr(kl, "_cuda_walk", lambda latents: True)
    adds, norms = [], []
    resnet, norm = kl._resnet, kl.group_norm

    def recording(block, x, x_bias, fold):
        out = resnet(block, x, x_bias, fold)
        adds.append(x.is_contiguous(memory_format=CL) and out.is_contiguous(memory_format=CL))
        return out

    def recording_norm(x, *args, input_bias=None, **kwargs):
        norms.append(input_bias is not None)
        return norm(x, *args, input_bias=input_bias, **kwargs)

    monkeypatch.setattr(kl, "_resnet", recording)
    monkeypatch.setattr(kl, "group_norm", recording_norm)
    z = _latents(2, 16)
    expected = _decode(model, z)
    seen = _record_convs(monkeypatch)
    got = decode_kl_latents(model, z)
    assert got.is_contiguous() and got.shape == expected.shape
    # channels_last convs without bias (oneDNN's other blocking of K = 9 x C_in <= 576) and the biases added
    # in the next pass, over 16 convs and 14 group norms. Measured max 1.8e-6 (1.6e-6 avx512 threads 1/2,
    # 1.75e-6 default, 1.8e-6 MKL_CBWR + oneDNN AVX2); 2e-5 is 11x that (1e-5 was 5.5x).
    assert rel_err(got, expected) < 2e-5
    assert len(seen) == _decoder_convs(model)
    assert all(is_cl for is_cl, _ in seen) and all(folded for _, folded in seen)
    assert len(adds) == 6 and all(adds)
    # Biases into the norms: every resnet's norm2 (after conv1) and the first resnet's norm1 (after
    # conv_in). (The upsampler feeds a resnet with a 1x1 conv shortcut, which needs the biased tensor.)
    assert model.decoder.up_blocks[1].resnets[0].conv_shortcut is not None
    assert sum(norms) == 6 + 1 and len(norms) == 2 * 6 + 1


# ---------------------------------------------------------------- what the walk does not cover


def test_tiling_falls_back_to_vae_decode(vae):
    tiled = copy.deepcopy(vae)
    tiled.enable_tiling()
    z = _latents(1, 16, size=12)  # larger than the 8-latent tiles: diffusers decodes blended tiles
    expected = _decode(tiled, z)
    assert not torch.equal(expected, _decode(vae, z))  # tiling changes the numbers...
    assert not vae_decode_supported(tiled)
    assert torch.equal(decode_kl_latents(tiled, z), expected)  # ...and we return diffusers' tiled ones
    assert vae_decode_supported(vae)  # a switch on one VAE does not leak into another's cached check


def test_slicing_falls_back(vae):
    sliced = copy.deepcopy(vae)
    sliced.enable_slicing()
    z = _latents(2, 16)
    assert not vae_decode_supported(sliced)
    assert torch.equal(decode_kl_latents(sliced, z), _decode(sliced, z))
    sliced.disable_slicing()  # checked at every call, not cached
    assert vae_decode_supported(sliced)


@pytest.mark.parametrize(
    "kwargs", [{"up": ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")}, {"act": "gelu"}], ids=["attn-up", "gelu"]
)
def test_other_decoders_fall_back(kwargs):
    model = _tiny_vae(**kwargs)
    z = _latents(2, 16)
    assert not vae_decode_supported(model)
    assert torch.equal(decode_kl_latents(model, z), _decode(model, z))


@pytest.mark.parametrize("where", ["resnet", "upsampler conv"])
def test_hooked_module_falls_back(vae, where):
    hooked = copy.deepcopy(vae)
    z = _latents(1, 16)
    plain = _decode(hooked, z)
    assert vae_decode_supported(hooked)  # cached as supported first: hooks are checked at every call
    block = hooked.decoder.up_blocks[0]
    module = block.resnets[0] if where == "resnet" else block.upsamplers[0].conv  # (CUDA: not called)
    handle = module.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    expected = _decode(hooked, z)
    assert not torch.equal(expected, plain)  # the hook matters...
    assert not vae_decode_supported(hooked)
    assert torch.equal(decode_kl_latents(hooked, z), expected)  # ...and is honoured
    handle.remove()
    assert vae_decode_supported(hooked)


def test_not_a_kl_vae():
    assert not vae_decode_supported(object())
    assert not vae_decode_supported(nn.Linear(2, 2))


# ---------------------------------------------------------------- the CUDA decode (GPU)


@needs_cuda_triton
def test_decode_on_cuda_bf16_is_as_accurate_as_diffusers():
    model = _tiny_vae()
    z = _latents(2, 16)
    exact = _decode(model, z)  # float32 on the CPU
    model = model.to("cuda", torch.bfloat16)
    zc = z.to("cuda", torch.bfloat16)
    theirs = _decode(model, zc)
    assert vae_decode_supported(model)
    ours = decode_kl_latents(model, zc)
    assert ours.dtype == torch.bfloat16 and ours.shape == theirs.shape
    # Our bf16 decode is as close to the float32 truth as diffusers' bf16 decode is (it rounds less).
    assert rel_err(ours.cpu(), exact) <= 2 * rel_err(theirs.cpu(), exact) + 1e-3
    assert rel_err(ours, theirs) < 5e-2


@needs_cuda_triton
def test_decode_on_cuda_runs_channels_last(monkeypatch):
    # Every conv (resnets, shortcuts, upsamplers, conv_in/out) sees a channels_last input, whatever the
    # latents' layout, and runs without its bias; the image comes back contiguous with the same numbers
    # either way.
    model = _tiny_vae().to("cuda", torch.bfloat16)
    z = _latents(2, 16).to("cuda", torch.bfloat16)
    seen = _record_convs(monkeypatch)
    assert vae_decode_supported(model)
    ours = decode_kl_latents(model, z)
    assert len(seen) == _decoder_convs(model)
    assert all(is_cl for is_cl, _ in seen) and all(folded for _, folded in seen)
    assert ours.is_contiguous()
    from_cl = decode_kl_latents(model, z.contiguous(memory_format=CL))
    assert rel_err(from_cl, ours) < 1e-3
    assert rel_err(ours, _decode(model, z)) < 5e-2
