"""diffserve.kernels.fused_ops: the CPU fallback against formulas written out here, and (on a GPU) the
Triton kernels against the fallback.

GPU tolerance: the kernels compute in float32 and round once; the fallback rounds some intermediates to
bf16, so in bf16 the two differ by about one bf16 rounding per element (relative error ~4e-3 worst case
per element, ~1e-3 over a tensor); in float32 they agree to ~1e-6.
"""

from __future__ import annotations

import pytest
import torch

from diffserve.kernels import fused_ops as fo
from tests.unit.gpu_helpers import rel_err

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, s, h, d): pair (2i, 2i+1) rotated by the angle of column i, as a complex product."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos.double(), sin.double())[:, None, :]
    return torch.view_as_real(pairs * rot).flatten(-2)


@pytest.fixture(autouse=True)
def _default_dispatch():
    fo.set_fused_ops(None)
    yield
    fo.set_fused_ops(None)


@pytest.mark.parametrize("per_token", [False, True])
def test_adaln_fallback_matches_formula(per_token):
    g = torch.Generator().manual_seed(0)
    b, s, d = 2, 5, 24
    x, y = torch.randn(b, s, d, generator=g), torch.randn(b, s, d, generator=g)
    mod = (b, s if per_token else 1, d)
    shift, scale, gate = (torch.randn(mod, generator=g) for _ in range(3))

    x2, h = fo.adaln(x, shift, scale, 1e-6, residual=y, gate=gate)
    expect_x = x.double() + y.double() * gate.double()
    # CPU bounds in this file are against float64 formulas: only the float32 result's own rounding counts.
    # x + y * gate: one or two roundings per element (FMA or not, per SIMD kernel), <= 1.2e-7; measured max
    # 3.4e-8 (threads 1/2, avx512/avx2/default), so 1e-6 = 29x. The norms below reduce over d = 24 (two
    # passes, mean then variance): measured max 9e-8, 1e-5 = 100x.
    assert rel_err(x2, expect_x) < 1e-6
    assert rel_err(h, _layer_norm(expect_x, 1e-6) * (1 + scale.double()) + shift.double()) < 1e-5

    x_only, none = fo.adaln(x, None, None, 0.0, residual=y, gate=None, normalize=False)
    assert none is None and torch.equal(x_only, x + y)

    same, h = fo.adaln(x, shift, scale, 1e-6)  # no residual: x comes back as is
    assert same is x and rel_err(h, _layer_norm(x, 1e-6) * (1 + scale.double()) + shift.double()) < 1e-5

    weight, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    _, h = fo.adaln(x, bias, weight, 1e-6, upcast=True, affine=True)
    assert rel_err(h, _layer_norm(x, 1e-6) * weight.double() + bias.double()) < 1e-5


def test_adaln_writes_h_where_asked():
    """out (a LoRA layer's wide input buffer, layers/lora.input_buffer): h itself lands there, nothing beside
    it is written."""
    from diffserve.runtime.layers.modulation import residual_norm_modulate

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    shift, scale, gate = (torch.randn(2, 1, 16, generator=g) for _ in range(3))
    want_x, want_h = fo.adaln(x, shift, scale, 1e-6, residual=y, gate=gate)
    buf = torch.full((10, 24), 7.0)
    view = buf[:, :16].view(2, 5, 16)
    got_x, h = residual_norm_modulate(x, y, gate, shift, scale, out=view)
    assert h is view and torch.equal(h, want_h) and torch.equal(got_x, want_x) and (buf[:, 16:] == 7).all()


def test_adaln_keeps_activation_dtype_with_float32_modulation():
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(1, 4, 16, generator=g).bfloat16() for _ in range(2))
    gate, shift, scale = (torch.randn(1, 1, 16, generator=g) for _ in range(3))  # float32, as in Wan
    x2, h = fo.adaln(x, shift, scale, 1e-6, upcast=True, residual=y, gate=gate)
    assert x2.dtype == h.dtype == torch.bfloat16
    # summed in float32, rounded once to bf16: <= 2^-8 = 3.9e-3 per element whatever the float32 order
    # (measured 1.57e-3 in every setting)
    assert rel_err(x2, x.double() + y.double() * gate.double()) < 4e-3


@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "across-heads"])
def test_qk_norm_rope_fallback_matches_formula(per_head):
    g = torch.Generator().manual_seed(2)
    b, s, heads, hd = 2, 6, 3, 8
    qkv = torch.randn(b, s, 3 * heads * hd, generator=g)
    q = qkv[..., : heads * hd]  # a column slice of a fused projection, as the models pass it
    weight = torch.randn(hd if per_head else heads * hd, generator=g)
    angles = torch.rand(s, hd // 2, generator=g) * 6.3
    cos, sin = angles.cos(), angles.sin()

    out = fo.qk_norm_rope(q, weight, 1e-6, cos, sin, hd, per_head)
    assert out.shape == (b, s, heads, hd)
    x = q.double().unflatten(-1, (heads, hd)) if per_head else q.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    expected = _rope(normed.reshape(b, s, heads, hd), cos, sin)
    # RMS norm over hd = 8 or heads * hd = 24, then a complex rotation (two products and a sum per element):
    # measured max 9.5e-8 (1e-5 = 100x); rope alone 4.2e-8 (1e-6 = 24x); every setting.
    assert rel_err(out, expected) < 1e-5

    # Rope only, and norm only.
    assert (
        rel_err(
            fo.qk_norm_rope(q, None, 0.0, cos, sin, hd, True), _rope(q.unflatten(-1, (heads, hd)), cos, sin)
        )
        < 1e-6
    )
    assert (
        rel_err(fo.qk_norm_rope(q, weight, 1e-6, None, None, hd, per_head), normed.reshape(b, s, heads, hd))
        < 1e-5
    )


def test_linear_gelu_fallback():
    g = torch.Generator().manual_seed(3)
    x, w, bias = (
        torch.randn(3, 5, 8, generator=g),
        torch.randn(16, 8, generator=g),
        torch.randn(16, generator=g),
    )
    z = x.double() @ w.double().T + bias.double()
    tanh_gelu = 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)))
    # a float32 GEMM with K = 8, the bias and tanh-GELU: measured max 7.7e-8 (MKL_CBWR; 6.0e-8..6.6e-8
    # elsewhere), 1e-6 = 13x
    assert rel_err(fo.linear_gelu(x, w, bias), tanh_gelu) < 1e-6


def test_switch_and_environment(monkeypatch):
    monkeypatch.setenv(fo.ENV_VAR, "0")
    assert not fo.fused_ops_enabled()
    monkeypatch.setenv(fo.ENV_VAR, "1")
    assert fo.fused_ops_enabled()
    fo.set_fused_ops(False)
    assert not fo.fused_ops_enabled()
    # CPU tensors never take the Triton path.
    fo.set_fused_ops(True)
    assert not fo._use_triton(torch.zeros(1))


# ---------------------------------------------------------------- GPU: Triton kernels against the fallback


def _both(fn, *args, **kwargs):
    """(Triton result, fallback result) of fused_ops.fn on the same CUDA inputs."""
    fo.set_fused_ops(True)
    fast = fn(*args, **kwargs)
    fo.set_fused_ops(False)
    slow = fn(*args, **kwargs)
    fo.set_fused_ops(None)
    return fast, slow


@gpu
@pytest.mark.parametrize(
    "dtype,dim,mod_dtype,tol",
    [
        (torch.bfloat16, 3072, torch.bfloat16, 8e-3),  # FLUX: bf16 modulation, norm in bf16
        (torch.bfloat16, 1536, torch.float32, 4e-3),  # Wan: float32 modulation, norm in float32
        (torch.float32, 1000, torch.float32, 1e-5),  # not a power of two: masked tail
    ],
)
@pytest.mark.parametrize("per_token", [False, True])
def test_triton_adaln_matches_fallback(dtype, dim, mod_dtype, tol, per_token):
    assert fo.triton_available(), "Triton must import on a CUDA machine"
    g = torch.Generator(device="cuda").manual_seed(4)
    b, s = 2, 333
    x, y = (torch.randn(b, s, dim, device="cuda", generator=g).to(dtype) for _ in range(2))
    mod = (b, s if per_token else 1, dim)
    shift, scale, gate = (torch.randn(mod, device="cuda", generator=g).to(mod_dtype) * 0.5 for _ in range(3))
    upcast = mod_dtype == torch.float32
    for kwargs in (
        dict(),
        dict(residual=y, gate=gate),
        dict(residual=y),
        dict(residual=y, gate=gate, normalize=False),
    ):
        (fx, fh), (sx, sh) = _both(fo.adaln, x, shift, scale, 1e-6, upcast, **kwargs)
        assert fx.dtype == sx.dtype == dtype and rel_err(fx, sx) < tol, kwargs
        if fh is not None:
            assert rel_err(fh, sh) < tol, kwargs
    weight, bias = torch.randn(dim, device="cuda", generator=g), torch.randn(dim, device="cuda", generator=g)
    (_, fh), (_, sh) = _both(fo.adaln, x, bias, weight, 1e-6, True, residual=y, gate=gate, affine=True)
    assert rel_err(fh, sh) < tol

    # out_h: h written into the left columns of a wider buffer (a LoRA layer's input, layers/lora.py):
    # the same values as into a new tensor, and the other columns untouched. Not bit for bit: Triton
    # compiles the kernel again for a row stride of another divisibility, whose reduction may round
    # differently (float32, 1,000 wide: an ulp); within the tolerance above.
    wide = torch.full((b * s, dim + 40), 7.0, device="cuda", dtype=dtype)
    view = wide[:, :dim].view(b, s, dim)
    fo.set_fused_ops(True)
    try:
        fx, fh = fo.adaln(x, shift, scale, 1e-6, upcast, residual=y, gate=gate)
        wx, wh = fo.adaln(x, shift, scale, 1e-6, upcast, residual=y, gate=gate, out_h=view)
    finally:
        fo.set_fused_ops(None)
    assert wh is view and rel_err(wh, fh) < tol and rel_err(wx, fx) < tol
    assert (wide[:, dim:] == 7).all()


@gpu
@pytest.mark.parametrize(
    "heads,hd,per_head,dtype,tol",
    [
        (24, 128, True, torch.bfloat16, 8e-3),  # FLUX
        (12, 128, False, torch.bfloat16, 8e-3),  # Wan
        (3, 16, True, torch.float32, 1e-5),  # heads not a power of two
    ],
)
def test_triton_qk_norm_rope_matches_fallback(heads, hd, per_head, dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(5)
    b, s = 2, 257
    qkv = torch.randn(b, s, 3 * heads * hd, device="cuda", generator=g).to(dtype)
    k = qkv[..., heads * hd : 2 * heads * hd]  # strided rows, as from a fused projection
    weight = torch.randn(hd if per_head else heads * hd, device="cuda", generator=g).to(dtype)
    angles = torch.rand(s, hd // 2, device="cuda", generator=g) * 100
    cos, sin = angles.cos(), angles.sin()
    for args in ((weight, 1e-6, cos, sin), (None, 0.0, cos, sin), (weight, 1e-6, None, None)):
        fast, slow = _both(fo.qk_norm_rope, k, *args, hd, per_head)
        assert fast.shape == slow.shape == (b, s, heads, hd) and fast.dtype == dtype
        assert rel_err(fast, slow) < tol


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("per_head", [True, False])
def test_qk_norm_rope_in_place_matches_out_of_place(device, per_head):
    # The in-place form normalises and rotates the k columns of a fused q|k|v buffer where they are, and
    # leaves the q and v columns untouched (Triton on CUDA, the reference + copy on the CPU).
    g = torch.Generator(device=device).manual_seed(8)
    heads, hd, b, s = 4, 32, 1, 77
    qkv = torch.randn(b, s, 3 * heads * hd, device=device, generator=g)
    weight = torch.randn(hd if per_head else heads * hd, device=device, generator=g)
    angles = torch.rand(s, hd // 2, device=device, generator=g) * 100
    expected = fo.qk_norm_rope(
        qkv[..., heads * hd : 2 * heads * hd], weight, 1e-6, angles.cos(), angles.sin(), hd, per_head
    )
    before = qkv.clone()
    got = fo.qk_norm_rope_(
        qkv[..., heads * hd : 2 * heads * hd], weight, 1e-6, angles.cos(), angles.sin(), hd, per_head
    )
    assert got.shape == (b, s, heads, hd) and got.data_ptr() == qkv.data_ptr() + heads * hd * 4
    # CPU: the same reference ops on the same shapes then a copy (measured 0 in every setting); GPU: Triton
    # in float32 vs the fallback, ~1 ulp per element
    assert rel_err(got, expected) < 1e-6
    assert torch.equal(qkv[..., : heads * hd], before[..., : heads * hd])
    assert torch.equal(qkv[..., 2 * heads * hd :], before[..., 2 * heads * hd :])
    assert not torch.equal(qkv, before)


@gpu
def test_linear_gelu_epilogue_matches_fallback():
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(2, 300, 512, device="cuda", generator=g).bfloat16()
    w = (torch.randn(2048, 512, device="cuda", generator=g) * 0.05).bfloat16()
    bias = torch.randn(2048, device="cuda", generator=g).bfloat16()
    fast, slow = _both(fo.linear_gelu, x, w, bias)
    assert fast.shape == slow.shape and rel_err(fast, slow) < 8e-3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_offset_residual_pieces_match_the_formulas(device):
    # Wan's folded blocks: the residual add inside the output GEMM with the gate folded into the weight
    # (linear_residual_), and a norm of x + a per-channel offset that never writes x + offset.
    from diffserve.runtime.layers.modulation import linear_residual_, offset_norm_modulate

    g = torch.Generator(device=device).manual_seed(9)
    b, s, d_in, d_out = 2, 65, 48, 40
    x = torch.randn(b, s, d_out, device=device, generator=g)
    inp = torch.randn(b, s, d_in, device=device, generator=g)
    weight = torch.randn(d_out, d_in, device=device, generator=g)
    gate = torch.randn(b, 1, d_out, device=device, generator=g)
    expected = x + (inp @ weight.t()) * gate
    # float32 against float32: the gate folded into the weight (K = 48) vs applied after the GEMM, the add
    # inside it: measured max 1.9e-7 (every setting), 1e-5 = 50x. The norms (d = 40): measured max 3.6e-8;
    # the last check (the same ops either way) 0.
    y = x.clone()
    assert linear_residual_(y, inp, weight, gate) is y and rel_err(y, expected) < 1e-5
    y = x.clone()
    assert linear_residual_(y, inp, weight) is y and rel_err(y, x + inp @ weight.t()) < 1e-5

    offset, shift, scale = (torch.randn(b, 1, d_out, device=device, generator=g) for _ in range(3))
    shifted = x + offset
    normed = torch.nn.functional.layer_norm(shifted, (d_out,), eps=1e-6)
    h = offset_norm_modulate(x, offset, shift, scale, 1e-6, upcast=True)
    assert rel_err(h, normed * (1 + scale) + shift) < 1e-5
    weight_1d, bias_1d = scale[0, 0], shift[0, 0]
    h = offset_norm_modulate(x, offset, bias_1d, weight_1d, 1e-6, upcast=True, affine=True)
    assert rel_err(h, normed * weight_1d + bias_1d) < 1e-5
    # No offset: the plain norm.
    assert (
        rel_err(
            offset_norm_modulate(x, None, shift, scale, 1e-6, True), fo.adaln(x, shift, scale, 1e-6, True)[1]
        )
        < 1e-6
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scale_rows_is_the_broadcast_multiply(device, dtype):
    # Wan's per-sample weight copies (linear_residual_): row o of the weight times gate[b, 0, o], rounded once
    # as torch.mul of the two rounds it. Sizes not a multiple of the kernel's block, and a strided gate.
    g = torch.Generator(device=device).manual_seed(4)
    weight = torch.randn(40, 1500, device=device, generator=g).to(dtype)
    gate = torch.randn(3, 40, 2, device=device, generator=g)[..., :1].transpose(1, 2)  # (3, 1, 40), strided
    expected = (weight.float() * gate.transpose(1, 2)).to(dtype)
    got = fo.scale_rows(weight, gate)
    assert got.shape == (3, 40, 1500) and got.dtype == dtype
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="gate must be"):
        fo.scale_rows(weight, gate.transpose(1, 2))
