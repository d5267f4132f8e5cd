"""The Triton kernels of the AutoencoderKL decode (diffserve.kernels.group_norm, _triton_bias_add) against
torch: GroupNorm(+SiLU) of x + input_bias against a float64 reference in both memory layouts, the
residual add with folded biases, and nearest 2x upsampling in channels last. The torch fallbacks (the
CPU path) are checked to be exactly F.group_norm then F.silu.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffserve.kernels import group_norm as gn
from tests.unit.gpu_helpers import needs_cuda_triton, rel_err

CL = torch.channels_last


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *[1] * (x.dim() - 2))


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
    out = torch.ops.diffserve.group_norm(x, 4, w, w, 1e-6, True, w)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device.type == "meta"
    if out_layout == "same":
        assert out.stride() == x.stride()
    else:
        assert not x.is_contiguous() and out.is_contiguous()
    assert gn._channels_last(x) == (layout in ("channels_last", "channels_innermost"))


def test_group_norm_input_bias_on_cpu_is_groupnorm_of_the_sum():
    # What a biased conv followed by the norm computes: x + bias rounded to x's dtype, then normalised.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 5, generator=g).bfloat16()
    w, b, ib = (torch.randn(16, generator=g).bfloat16() for _ in range(3))
    expected = F.silu(F.group_norm(x + ib.view(1, -1, 1, 1), 4, w, b, 1e-6))
    assert torch.equal(gn.group_norm(x, 4, w, b, 1e-6, silu=True, input_bias=ib), expected)
    assert not torch.equal(gn.group_norm(x, 4, w, b, 1e-6, silu=True), expected)


def test_cpu_tensors_never_take_the_kernel_path():
    assert not gn._kernel_fits(torch.randn(1, 8, 4, 4), 4, None, None)


# ---------------------------------------------------------------- the Triton kernels (GPU)


def _reference64(x, groups, w, b, eps, silu):
    y = F.group_norm(x.double(), groups, w.double(), b.double(), eps)
    return F.silu(y) if silu else y


@needs_cuda_triton
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
    assert rel_err(got, _reference64(x, groups, w, b, 1e-6, silu)) < (
        1e-5 if dtype == torch.float32 else 1e-2
    )


def _memory_format(shape):
    return CL if len(shape) == 4 else torch.channels_last_3d


@needs_cuda_triton
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
    assert rel_err(got, _reference64(x, groups, w, b, 1e-6, silu)) < (
        1e-5 if dtype == torch.float32 else 1e-2
    )


@needs_cuda_triton
def test_triton_group_norm_without_affine_and_other_layouts():
    x = torch.randn(2, 96, 20, 26, device="cuda") * 3 + 1
    for view in (x.contiguous(memory_format=CL), x[..., ::2], x.transpose(2, 3)):  # channels last, strided
        got = gn.group_norm(view, 32, None, None, 1e-6, silu=True)
        expected = F.silu(F.group_norm(view.double(), 32, eps=1e-6))
        assert rel_err(got, expected) < 1e-5
        if gn._channels_last(view):
            assert got.stride() == view.stride()
        else:
            assert got.is_contiguous()


@needs_cuda_triton
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
    assert rel_err(out, _reference64(x, 32, w, b, 1e-6, True)) < 1e-2


@needs_cuda_triton
@pytest.mark.parametrize(
    "shape, groups, fmt",
    [
        ((1, 512, 24, 40), 32, CL),
        ((2, 96, 37, 53), 32, CL),  # 3 channels per group, masked channel tiles
        ((1, 64, 3, 20, 30), 16, torch.channels_last_3d),
        ((2, 96, 37, 53), 32, torch.contiguous_format),  # chunks spanning channels: per-element bias
        ((1, 64, 3, 20, 30), 16, torch.contiguous_format),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_group_norm_input_bias_matches_float64(shape, groups, fmt, dtype):
    # GroupNorm(x + input_bias) without x + input_bias ever written; a large bias (and a mean of 100)
    # moves every group's statistics, so a bias applied to the wrong channel, or only in one pass, shows.
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) + 100).to(dtype).contiguous(memory_format=fmt)
    w, b = (torch.randn(shape[1], device="cuda", generator=g).to(dtype) for _ in range(2))
    ib = (torch.randn(shape[1], device="cuda", generator=g) * 5).to(dtype)
    assert gn._kernel_fits(x, groups, w, b, ib) and gn._channels_last(x) == (fmt != torch.contiguous_format)
    got = gn.group_norm(x, groups, w, b, 1e-6, silu=True, input_bias=ib)
    assert got.dtype == dtype and got.stride() == x.stride()
    x64 = x.double() + _per_channel(ib.double(), x)
    expected = F.silu(F.group_norm(x64, groups, w.double(), b.double(), 1e-6))
    assert rel_err(got, expected) < (1e-5 if dtype == torch.float32 else 1e-2)


def _dense(shape, fmt, dtype, g):
    return torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)


@needs_cuda_triton
@pytest.mark.parametrize(
    "shape, fmt",
    [
        ((2, 128, 33, 47), CL),
        ((1, 3, 37, 53), CL),  # conv_out: 3 channels
        ((2, 96, 5, 7, 9), torch.channels_last_3d),
        ((2, 24, 37, 53), torch.contiguous_format),
        ((1, 5, 9, 11), torch.contiguous_format),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "has_b, has_bias, has_bias2", [(True, True, True), (False, True, False), (True, False, True)]
)
def test_triton_add_bias_matches_torch(shape, fmt, dtype, has_b, has_bias, has_bias2):
    from diffserve.kernels._triton_bias_add import add_bias

    g = torch.Generator(device="cuda").manual_seed(1)
    a = _dense(shape, fmt, dtype, g)
    b = _dense(shape, fmt, dtype, g) if has_b else None
    bias, bias2 = (
        torch.randn(shape[1], device="cuda", generator=g).to(dtype) if has else None
        for has in (has_bias, has_bias2)
    )
    got = add_bias(a, b, bias, bias2)
    assert got.dtype == dtype and got.stride() == a.stride()
    terms = [a.double()] + [
        t.double() if t.dim() > 1 else _per_channel(t.double(), a) for t in (b, bias, bias2) if t is not None
    ]
    expected, size = sum(terms), sum(t.abs() for t in terms)
    # Summed in float32 and rounded once: within an ulp of the exact sum (a bias on the wrong channel is
    # off by O(1)), plus float32's error of the sum.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-23
    assert ((got.double() - expected).abs() <= expected.abs() * ulp + size * 2.0**-22).all()


@needs_cuda_triton
@pytest.mark.parametrize("shape", [(1, 512, 64, 64), (2, 96, 7, 9), (1, 3, 5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_upsample_is_nearest_interpolation(shape, dtype):
    from diffserve.kernels._triton_bias_add import upsample_nearest2x_channels_last

    x = _dense(shape, CL, dtype, torch.Generator(device="cuda").manual_seed(2))
    got = upsample_nearest2x_channels_last(x)
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got, F.interpolate(x, scale_factor=2.0, mode="nearest"))
