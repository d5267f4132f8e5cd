"""diffserve.kernels.group_norm and diffserve.runtime.kl_vae_decode against F.group_norm and
AutoencoderKL.decode.

On the CPU group_norm is the reference (F.group_norm then F.silu), so the fused decode walk must equal
vae.decode bit for bit; the GPU tests check the Triton kernels against a float64 reference and the walk
against diffusers in bf16.
"""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffserve.kernels import fused_ops
from diffserve.kernels import group_norm as gn
from diffserve.runtime import kl_vae_decode as kl
from diffserve.runtime.kl_vae_decode import decode_kl_latents, vae_decode_supported

CL = torch.channels_last
gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and fused_ops.triton_available()), reason="needs a CUDA GPU with Triton"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


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


# ---------------------------------------------------------------- group_norm, the reference path


@pytest.mark.parametrize("shape", [(2, 32, 7, 9), (1, 24, 3, 5, 6)])
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_on_cpu_is_groupnorm_then_silu(shape, groups, silu, affine):
    g = torch.Generator().manual_seed(groups)
    x = torch.randn(shape, generator=g) * 3 + 1
    norm = nn.GroupNorm(groups, shape[1], eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[1], generator=g))
            norm.bias.copy_(torch.randn(shape[1], generator=g))
    expected = nn.SiLU()(norm(x)) if silu else norm(x)
    got = gn.group_norm(x, groups, norm.weight, norm.bias, norm.eps, silu=silu)
    assert got.dtype == x.dtype and torch.equal(got, expected)
    if silu:  # the activation is really applied (and only when asked)
        assert not torch.equal(got, norm(x))


def test_group_norm_keeps_torch_errors():
    with pytest.raises(RuntimeError):  # channels not divisible by the groups
        gn.group_norm(torch.randn(1, 6, 4, 4), 4, None, None, 1e-6)


def test_group_norm_channels_last_on_cpu():
    # The VAE's residual stream is channels_last after the mid block's attention.
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(gn.group_norm(x, 4, None, None, 1e-6, silu=True), F.silu(F.group_norm(x, 4, eps=1e-6)))


def _meta(shape, layout):
    x = torch.empty(shape, device="meta", dtype=torch.bfloat16)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    if layout == "channels_innermost":  # (N, C, L) as a transposed view of (N, L, C)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":  # not dense: the op reads a contiguous copy
        return torch.empty(*shape[:-1], 2 * shape[-1], device="meta", dtype=torch.bfloat16)[..., ::2]
    return x


@pytest.mark.parametrize(
    "shape, layout, out_layout",
    [
        ((2, 8, 5, 7), "contiguous", "same"),
        ((2, 8, 5, 7), "channels_last", "same"),
        ((2, 8, 3, 5, 7), "channels_last", "same"),
        ((2, 8, 35), "channels_innermost", "same"),
        ((2, 8, 5, 7), "strided", "contiguous"),
    ],
)
def test_group_norm_custom_op_shape_inference(shape, layout, out_layout):
    # The op torch.compile sees: registered, with a fake implementation giving x's shape, dtype and the
    # layout the kernels write: x's for a contiguous or channels-last x, contiguous for anything else.
    x = _meta(shape, layout)
    w = torch.empty(8, device="meta", dtype=torch.bfloat16)
    out = torch.ops.diffserve.group_norm(x, 4, w, w, 1e-6, True)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device.type == "meta"
    if out_layout == "same":
        assert out.stride() == x.stride()
    else:
        assert not x.is_contiguous() and out.is_contiguous()
    assert gn._channels_last(x) == (layout in ("channels_last", "channels_innermost"))


def test_cpu_tensors_never_take_the_kernel_path():
    assert not gn._kernel_fits(torch.randn(1, 8, 4, 4), 4, None, None)


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

    def counting(x, *args, silu=False):
        calls.append(silu)
        return gn.group_norm(x, *args, silu=silu)

    monkeypatch.setattr(kl, "group_norm", counting)
    assert vae_decode_supported(model)
    got = decode_kl_latents(model, z)

    assert got.shape == (batch, 3, 16, 16) and got.dtype == expected.dtype
    assert torch.equal(got, expected)
    # The fused path really ran: one norm+SiLU per resnet norm (mid: 2 resnets, up: 2 x 2) and the head.
    n_resnets = len(model.decoder.mid_block.resnets) + sum(len(b.resnets) for b in model.decoder.up_blocks)
    assert calls == [True] * (2 * n_resnets + 1)
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


def _record_conv_inputs(model) -> list[tuple[str, bool]]:
    """Forward pre-hooks on every decoder conv (modules the walk calls, not ones it steps around, so the
    hooks do not turn the walk off), recording whether each input is channels_last."""
    seen = []

    def hook(name):
        return lambda module, args: seen.append((name, args[0].is_contiguous(memory_format=CL)))

    for name, m in model.decoder.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(hook(name))
    return seen


def test_cpu_decode_keeps_the_latents_layout(vae):
    model = copy.deepcopy(vae)
    seen = _record_conv_inputs(model)
    decode_kl_latents(model, _latents(1, 16))
    assert seen and not seen[0][1]  # conv_in's input: NCHW on the CPU, as under vae.decode


def test_channels_last_walk_on_the_cpu(vae, monkeypatch):
    # The CUDA layout (latents made channels_last, image made contiguous) run on the CPU: every conv and
    # every residual add sees channels_last, and the numbers are vae.decode's up to float32 rounding.
    model = copy.deepcopy(vae)
    monkeypatch.setattr(kl, "_channels_last_decode", lambda latents: True)
    adds = []
    resnet = kl._resnet

    def recording(block, x):
        out = resnet(block, x)
        adds.append(x.is_contiguous(memory_format=CL) and out.is_contiguous(memory_format=CL))
        return out

    monkeypatch.setattr(kl, "_resnet", recording)
    z = _latents(2, 16)
    expected = _decode(model, z)
    seen = _record_conv_inputs(model)
    got = decode_kl_latents(model, z)
    assert got.is_contiguous() and got.shape == expected.shape
    assert _rel(got, expected) < 1e-5
    assert len(seen) == sum(isinstance(m, nn.Conv2d) for m in model.decoder.modules())
    assert all(is_cl for _, is_cl in seen), [name for name, is_cl in seen if not is_cl]
    assert len(adds) == 6 and all(adds)


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


def test_hooked_module_falls_back(vae):
    hooked = copy.deepcopy(vae)
    z = _latents(1, 16)
    plain = _decode(hooked, z)
    assert vae_decode_supported(hooked)  # cached as supported first: hooks are checked at every call
    handle = hooked.decoder.up_blocks[0].resnets[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    expected = _decode(hooked, z)
    assert not torch.equal(expected, plain)  # the hook matters...
    assert not vae_decode_supported(hooked)
    assert torch.equal(decode_kl_latents(hooked, z), expected)  # ...and is honoured
    handle.remove()
    assert vae_decode_supported(hooked)


def test_not_a_kl_vae():
    assert not vae_decode_supported(object())
    assert not vae_decode_supported(nn.Linear(2, 2))


# ---------------------------------------------------------------- the Triton kernels (GPU)


def _reference64(x, groups, w, b, eps, silu):
    y = F.group_norm(x.double(), groups, w.double(), b.double(), eps)
    return F.silu(y) if silu else y


@gpu
@pytest.mark.parametrize(
    "shape, groups", [((1, 128, 1024, 1024), 32), ((2, 96, 37, 53), 32), ((1, 64, 3, 20, 30), 16)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 100.0])  # |mean| >> std: naive sum/sum-of-squares would fail
@pytest.mark.parametrize("silu", [False, True])
def test_triton_group_norm_matches_float64(shape, groups, dtype, offset, silu):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) + offset).to(dtype)
    w = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    b = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    assert gn._kernel_fits(x, groups, w, b)
    got = gn.group_norm(x, groups, w, b, 1e-6, silu=silu)
    assert got.dtype == dtype and got.shape == x.shape
    assert _rel(got, _reference64(x, groups, w, b, 1e-6, silu)) < (1e-5 if dtype == torch.float32 else 1e-2)


def _memory_format(shape):
    return CL if len(shape) == 4 else torch.channels_last_3d


@gpu
@pytest.mark.parametrize(
    "shape, groups",
    [
        ((1, 128, 1024, 1024), 32),  # the FLUX decoder's last stage: 1024 chunks of 32 tiles
        ((2, 96, 37, 53), 32),  # 3 channels per group, C not a power of two (masked channel tiles)
        ((1, 64, 19, 23), 32),
        ((1, 512, 24, 40), 32),
        ((1, 2048, 6, 7), 32),  # two channel blocks
        ((1, 64, 3, 20, 30), 16),  # channels_last_3d
        ((2, 96, 5, 7, 9), 32),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("silu", [False, True])
def test_triton_group_norm_channels_last_matches_float64(shape, groups, dtype, offset, silu):
    g = torch.Generator(device="cuda").manual_seed(0)
    fmt = _memory_format(shape)
    x = (torch.randn(shape, device="cuda", generator=g) + offset).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    b = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
    assert gn._kernel_fits(x, groups, w, b) and gn._channels_last(x)
    got = gn.group_norm(x, groups, w, b, 1e-6, silu=silu)
    assert got.dtype == dtype and got.shape == x.shape
    assert got.is_contiguous(memory_format=fmt) and got.stride() == x.stride()  # written channels last
    assert _rel(got, _reference64(x, groups, w, b, 1e-6, silu)) < (1e-5 if dtype == torch.float32 else 1e-2)


@gpu
def test_triton_group_norm_without_affine_and_other_layouts():
    x = torch.randn(2, 96, 20, 26, device="cuda") * 3 + 1
    for view in (x.contiguous(memory_format=CL), x[..., ::2], x.transpose(2, 3)):  # channels last, strided
        got = gn.group_norm(view, 32, None, None, 1e-6, silu=True)
        expected = F.silu(F.group_norm(view.double(), 32, eps=1e-6))
        assert _rel(got, expected) < 1e-5
        if gn._channels_last(view):
            assert got.stride() == view.stride()
        else:
            assert got.is_contiguous()


@gpu
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_triton_group_norm_replays_in_a_cuda_graph(fmt):
    x = torch.randn(2, 64, 48, 40, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
    w = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gn.group_norm(x, 32, w, b, 1e-6, silu=True)  # compile the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gn.group_norm(x, 32, w, b, 1e-6, silu=True)
    x.copy_(torch.randn_like(x) * 5 + 3)  # new inputs after capture: the replay must use them
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(out, _reference64(x, 32, w, b, 1e-6, True)) < 1e-2


@gpu
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
    assert _rel(ours.cpu(), exact) <= 2 * _rel(theirs.cpu(), exact) + 1e-3
    assert _rel(ours, theirs) < 5e-2


@gpu
def test_decode_on_cuda_runs_channels_last():
    # Every conv (resnets, shortcuts, upsamplers, conv_in/out) sees a channels_last input, whatever the
    # latents' layout, and the image comes back contiguous with the same numbers either way.
    model = _tiny_vae().to("cuda", torch.bfloat16)
    z = _latents(2, 16).to("cuda", torch.bfloat16)
    seen = _record_conv_inputs(model)
    assert vae_decode_supported(model)
    ours = decode_kl_latents(model, z)
    assert len(seen) == sum(isinstance(m, nn.Conv2d) for m in model.decoder.modules())
    assert all(is_cl for _, is_cl in seen), [name for name, is_cl in seen if not is_cl]
    assert ours.is_contiguous()
    from_cl = decode_kl_latents(model, z.contiguous(memory_format=CL))
    assert _rel(from_cl, ours) < 1e-3
    assert _rel(ours, _decode(model, z)) < 5e-2
