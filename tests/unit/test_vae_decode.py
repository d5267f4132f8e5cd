"""diffserve.runtime.vae_decode.decode_wan_latents against AutoencoderKLWan.decode on a tiny random VAE."""

from __future__ import annotations

import diffusers
import pytest
import torch

from diffserve.runtime.vae_decode import decode_wan_latents, receptive_halo, strips


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_wan_vae(**config) -> diffusers.AutoencoderKLWan:
    """A tiny AutoencoderKLWan (also for test_wan_vae_walk) with every weight random and the gains near
    one, so that each layer and bias matters."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, **config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def vae():
    return random_wan_vae()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 4, 2, 4, 24, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(vae, latents):
    with torch.no_grad():
        return vae.decode(latents, return_dict=False)[0]


def test_whole_frames_equal_vae_decode(vae, latents, expected):
    got = decode_wan_latents(vae, latents)
    assert got.shape == (2, 3, 1 + 4 * 1, 32, 192)
    # One video at a time against vae.decode's batch of 2: the 31 3D convs (K <= 27 x 16 = 432) run with
    # another batch, so oneDNN blocks their sums differently. Measured max 6.2e-7
    # (threads 1/2, avx512/avx2/default, oneDNN AVX2/SSE4.1); 1e-5 is 16x that (1e-6 was 1.6x).
    assert _rel(got, expected) < 1e-5
    assert got.abs().max() <= 1.0 and (got.abs() == 1.0).any()  # clamped, as diffusers clamps


@pytest.mark.parametrize("tiles", [2, 3])
def test_strips_with_the_receptive_halo_are_exact(vae, latents, expected, tiles):
    # Wan2.1's layout (3 residual blocks per stage) needs 13 columns; this tiny one (2 per stage) 9.
    assert receptive_halo(vae.decoder) == 9
    # as above, per strip: measured max 6.2e-7, 16x below the bound
    assert _rel(decode_wan_latents(vae, latents, tiles=tiles), expected) < 1e-5


def test_strips_without_enough_halo_are_not(vae, latents, expected):
    # The halo is what makes strips exact: with too little, the seams differ.
    assert _rel(decode_wan_latents(vae, latents, tiles=2, halo=2), expected) > 1e-3


def test_strip_layout():
    assert strips(104, 2, 13) == [(0, 52, 0, 65), (52, 104, 39, 104)]
    assert strips(5, 1, 13) == [(0, 5, 0, 5)]
    cores = strips(60, 7, 3)
    assert (
        cores[0][0] == 0
        and cores[-1][1] == 60
        and all(a[1] == b[0] for a, b in zip(cores, cores[1:], strict=False))
    )
