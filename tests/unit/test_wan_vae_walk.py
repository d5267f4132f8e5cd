"""The CUDA walk of the Wan VAE decoder (runtime/wan_vae_walk.py) and its fused channel RMS norm
(kernels/channel_rms_norm.py), against AutoencoderKLWan.decode and WanRMS_norm."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
from torch import nn

from diffserve.kernels.channel_rms_norm import channel_rms_norm, channel_rms_norm_reference
from diffserve.runtime import vae_decode, wan_vae_walk
from diffserve.runtime.vae_decode import decode_wan_latents
from tests.unit.gpu_helpers import needs_cuda_triton, rel_err
from tests.unit.test_vae_decode import random_wan_vae

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def vae():
    return random_wan_vae()


@pytest.fixture(scope="module")
def latents():
    # 3 latent frames: the first chunk (1 frame, the temporal upsamplers skipped), the second (their
    # history starts from zeros) and a third (history from real frames); batch 2: a fresh history each.
    return torch.randn(2, 4, 3, 4, 24, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(vae, latents):
    with torch.no_grad():
        return vae.decode(latents, return_dict=False)[0]


def _force_walk(monkeypatch, calls: list | None = None):
    monkeypatch.setattr(vae_decode, "_walk_on", lambda latents: True)
    if calls is not None:
        original = wan_vae_walk.WanWalk.back

        def counting(self, x):
            calls.append(x.shape)
            return original(self, x)

        monkeypatch.setattr(wan_vae_walk.WanWalk, "back", counting)


@pytest.mark.parametrize("tiles", [1, 2])
def test_walk_equals_vae_decode_in_float32(vae, latents, expected, monkeypatch, tiles):
    calls: list = []
    _force_walk(monkeypatch, calls)
    got = decode_wan_latents(vae, latents, tiles=tiles)
    assert len(calls) == 2 * 3 * tiles  # the walk ran: per video, latent frame and strip
    assert got.shape == expected.shape == (2, 3, 9, 32, 192)
    # summation order only: 31 channels-last 3D convs (K <= 27 x 16 = 432, another oneDNN blocking) and
    # the fused norms. Measured max 7.0e-7 (threads 1/2, avx512/avx2/default, oneDNN AVX2/SSE4.1,
    # MKL_CBWR=COMPATIBLE): 1e-5 is 14x that; likewise below.
    assert rel_err(got, expected) < 1e-5
    assert got.abs().max() <= 1.0


@pytest.mark.parametrize("walk", [True, False])
def test_several_latent_frames_at_once_equal_vae_decode(vae, monkeypatch, walk):
    z = torch.randn(1, 4, 4, 4, 24, generator=torch.Generator().manual_seed(4))  # chunks [0], [1, 2], [3]
    with torch.no_grad():
        want = vae.decode(z, return_dict=False)[0]
    if walk:
        _force_walk(monkeypatch)
    assert vae_decode.chunks(4, 2) == [(0, 1), (1, 3), (3, 4)]
    assert rel_err(decode_wan_latents(vae, z, frames_at_once=2), want) < 1e-5  # measured max 6.4e-7


def test_cpu_default_is_the_modules_bit_for_bit(vae, latents, monkeypatch):
    calls: list = []
    monkeypatch.setattr(wan_vae_walk.WanWalk, "back", lambda self, x: calls.append(1))
    one = latents[:1]  # (vae.decode convolves a batch at once, we one video at a time: batch 1 is exact)
    with torch.no_grad():
        assert torch.equal(decode_wan_latents(vae, one), vae.decode(one, return_dict=False)[0])
    assert calls == []


def test_padded_channels_walk_equals_vae_decode(vae, latents, expected, monkeypatch):
    # Wan2.1's 96-channel convs get a 128-channel input; at this VAE's widths (8, 16) a multiple of 16
    # pads its 8-channel convs with 16 outputs the same way.
    monkeypatch.setattr(wan_vae_walk, "CHANNEL_MULTIPLE", 16)
    padded = []
    original = wan_vae_walk.padded_channels

    def recording(conv):
        n = original(conv)
        padded.append(n > conv.in_channels)
        return n

    monkeypatch.setattr(wan_vae_walk, "padded_channels", recording)
    _force_walk(monkeypatch)
    assert rel_err(decode_wan_latents(vae, latents), expected) < 1e-5  # zero-padded K; measured max 7.0e-7
    assert any(padded) and not all(padded)


def test_walk_in_bf16_is_as_close_to_float32_as_diffusers(vae, latents, expected, monkeypatch):
    half = random_wan_vae().to(torch.bfloat16)
    with torch.no_grad():
        theirs = half.decode(latents.bfloat16(), return_dict=False)[0]
    _force_walk(monkeypatch)
    ours = decode_wan_latents(half, latents.bfloat16())
    assert ours.dtype == torch.bfloat16
    # Both round the same chain in bf16; what differs is where the biases are added (one rounding).
    assert rel_err(ours.float(), expected) < 1.5 * rel_err(theirs.float(), expected)
    assert rel_err(ours.float(), theirs.float()) < 3e-2


@pytest.mark.parametrize(
    ("platform", "on_gpu", "walk"), [("cuda", True, True), ("rocm", True, False), ("cpu", False, False)]
)
def test_the_walk_runs_on_nvidia_gpus_only(monkeypatch, platform, on_gpu, walk):
    from diffserve import platforms

    monkeypatch.setenv("DIFFSERVE_PLATFORM", platform)
    platforms.reset_current_platform()
    try:
        latents = type("Latents", (), {"is_cuda": on_gpu})()  # (a ROCm build's tensors report is_cuda too)
        assert vae_decode._walk_on(latents) is walk
    finally:
        monkeypatch.delenv("DIFFSERVE_PLATFORM")
        platforms.reset_current_platform()


def test_unsupported_decoders_take_the_modules(vae):
    assert wan_vae_walk.walk_supported(vae.decoder)
    assert not wan_vae_walk.walk_supported(random_wan_vae(is_residual=True).decoder)  # Wan2.2's up blocks
    other = random_wan_vae()
    other.decoder.up_blocks[1].resnets[0].nonlinearity = nn.GELU()
    assert not wan_vae_walk.walk_supported(other.decoder)
    hooked = random_wan_vae()
    hooked.decoder.up_blocks[0].resnets[0].conv1.register_forward_hook(lambda *a: None)
    assert not wan_vae_walk.walk_supported(hooked.decoder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_rms_norm_reference_is_wan_rms_norm_then_silu(dtype):
    torch.manual_seed(2)
    norm = WanRMS_norm(6, images=False).to(dtype)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn_like(norm.gamma))
    x = torch.randn(2, 6, 3, 4, 5, dtype=dtype)
    bias = torch.randn(6, dtype=dtype)
    got = channel_rms_norm(x, norm.gamma, norm.scale, silu=True, input_bias=bias)
    assert torch.equal(got, nn.functional.silu(norm(x + bias.view(-1, 1, 1, 1))))
    out = torch.full((2, 9, 3, 4, 5), 7.0, dtype=dtype)  # wider: the extra channels become zeros
    assert channel_rms_norm(x, norm.gamma, norm.scale, out=out) is out
    assert torch.equal(out[:, :6], norm(x)) and (out[:, 6:] == 0).all()
    with pytest.raises(ValueError):
        channel_rms_norm(x, norm.gamma, norm.scale, out=torch.empty(2, 5, 3, 4, 5, dtype=dtype))


# ------------------------------------------------------------------------------------------- on the GPU


@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [96, 192, 384, 3])
def test_triton_channel_rms_norm_matches_the_reference(dtype, channels):
    torch.manual_seed(3)
    x = torch.randn(1, channels, 5, 12, 20, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last_3d
    )
    gamma, bias, in_bias = (torch.randn(channels, device="cuda", dtype=dtype) for _ in range(3))
    scale = channels**0.5
    exact = channel_rms_norm_reference(x.float(), gamma.float(), scale, bias.float(), True, in_bias.float())
    torch_chain = channel_rms_norm_reference(x, gamma, scale, bias, True, in_bias)
    # Written into the tail frames of a larger buffer with padding channels, as the walk does.
    wide = channels + (32 if channels % 64 else 0)
    buf = torch.full((1, wide, 7, 12, 20), 5.0, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last_3d
    )
    got = channel_rms_norm(x, gamma, scale, bias, True, in_bias, out=buf[:, :, 2:])
    assert got.data_ptr() == buf[:, :, 2:].data_ptr()
    assert (buf[:, :, :2] == 5.0).all() and (buf[:, channels:, 2:] == 0).all()
    got = got[:, :channels]
    if dtype == torch.float32:
        assert rel_err(got, exact) < 1e-5
    else:  # float32 inside, one rounding: as close to float32 as torch's chain of rounded ops, or closer
        assert rel_err(got.float(), exact) <= rel_err(torch_chain.float(), exact) + 1e-4
        # and apart from that chain by about its roundings (bf16 has 8 bits, fp16 11)
        assert rel_err(got.float(), torch_chain.float()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@needs_cuda_triton
def test_triton_channel_rms_norm_refuses_nothing_it_cannot_read():
    # A contiguous (not channels-last) x takes the reference path and is still right.
    x = torch.randn(1, 8, 2, 3, 4, device="cuda")
    gamma = torch.randn(8, device="cuda")
    assert (
        rel_err(
            channel_rms_norm(x, gamma, 2.0, silu=True), channel_rms_norm_reference(x, gamma, 2.0, None, True)
        )
        < 1e-6
    )


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_takes_the_walk_and_matches_vae_decode(latents, dtype, monkeypatch):
    vae = random_wan_vae().to("cuda")
    z = latents.to("cuda")
    with torch.no_grad():
        reference = vae.decode(z, return_dict=False)[0]  # float32
    vae = vae.to(dtype)
    with torch.no_grad():
        theirs = vae.decode(z.to(dtype), return_dict=False)[0]
    calls: list = []
    original = wan_vae_walk.WanWalk.back
    monkeypatch.setattr(wan_vae_walk.WanWalk, "back", lambda self, x: calls.append(1) or original(self, x))
    old_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions in float32 on both sides
    try:
        ours = decode_wan_latents(vae, z.to(dtype))
        if dtype == torch.float32:
            with torch.no_grad():
                reference = vae.decode(z, return_dict=False)[0]
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    assert len(calls) == 2 * 3
    if dtype == torch.float32:
        assert rel_err(ours, reference) < 1e-5
    else:
        assert rel_err(ours.float(), reference) < 1.5 * rel_err(theirs.float(), reference)
