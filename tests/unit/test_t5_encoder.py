"""The fused T5 / UMT5 encoder forward (runtime/t5_encoder.py) against transformers' own forward, and its
elementwise kernels (kernels/t5_ops.py) against transformers' modules."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
from transformers.activations import NewGELUActivation
from transformers.models.t5.modeling_t5 import T5LayerNorm

from diffserve.kernels import t5_ops
from diffserve.runtime.t5_encoder import fuse_t5, why_not_fused
from tests.unit.gpu_helpers import needs_cuda_triton, rel_err

SIZES = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4)
ENCODERS = {
    "t5": lambda: T5EncoderModel(T5Config(**SIZES, feed_forward_proj="gated-gelu")),
    "umt5": lambda: UMT5EncoderModel(UMT5Config(**SIZES, feed_forward_proj="gated-gelu")),
}


def build(name, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = ENCODERS[name]().eval().to(device, dtype)
    with torch.no_grad():  # norm weights away from 1 and biases away from 0, so that a mix-up shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in n:
                p.normal_(0.0, 1.0)
    return model


def inputs(device="cpu", length=12):
    ids = torch.randint(2, 64, (2, length), generator=torch.Generator().manual_seed(7)).to(device)
    mask = torch.ones(2, length, dtype=torch.long, device=device)
    mask[1, length - 3 :] = 0
    return ids, mask


def module_states(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_forward_gives_the_module_states(name, with_mask):
    model = build(name)
    ids, mask = inputs()
    mask = mask if with_mask else None
    expected = module_states(model, ids, mask)
    fused = fuse_t5(model)
    assert fused is not None
    # float32: the fused q|k|v and wi_0|wi_1 GEMMs keep K (32, 48) and widen N, so each element is the same
    # dot product: measured 0 difference in every setting (threads 1/2, avx512/avx2/default, MKL_CBWR). A BLAS
    # that blocks the wider N otherwise moves a few ulps of outputs up to |3| over 3 layers; 1e-5 is ~50 ulps.
    torch.testing.assert_close(fused(ids, mask), expected, rtol=1e-5, atol=1e-5)
    # The module still works: its q/k/v and wi_0/wi_1 weights are now views of the fused tensors.
    torch.testing.assert_close(module_states(model, ids, mask), expected, rtol=1e-5, atol=1e-5)
    layer = model.encoder.block[1].layer
    qkv = layer[0].SelfAttention.qkv_weight
    assert layer[0].SelfAttention.k.weight.data_ptr() == qkv[SIZES["d_kv"] * SIZES["num_heads"] :].data_ptr()
    wi = layer[1].DenseReluDense.wi_weight
    assert layer[1].DenseReluDense.wi_1.weight.data_ptr() == wi[SIZES["d_ff"] :].data_ptr()


def test_weights_loaded_after_fusing_reach_the_fused_forward():
    # load_state_dict copies into the parameters, which are views of the fused tensors.
    model, other = build("t5"), build("t5")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    ids, mask = inputs()
    expected = module_states(other, ids, mask)
    fused = fuse_t5(model)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(fused(ids, mask), expected, rtol=1e-5, atol=1e-5)  # as in the test above


def test_what_is_left_to_the_module():
    assert why_not_fused(build("t5")) is None
    assert "float16" in why_not_fused(build("t5").half())
    relu = T5EncoderModel(T5Config(**SIZES)).eval()  # T5 v1.0: a plain ReLU feed-forward
    assert "gelu_new" in why_not_fused(relu)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4))  # fmt: skip
    assert "not a T5" in why_not_fused(clip)
    hooked = build("umt5")
    hooked.encoder.block[0].register_forward_hook(lambda *a: None)
    assert "hooks" in why_not_fused(hooked)
    assert "training" in why_not_fused(build("t5").train())
    assert fuse_t5(relu) is None


def test_reference_ops_are_the_module_formulas():
    # The CPU path of the ops computes exactly what transformers' T5LayerNorm and NewGELU compute.
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(5, 32, generator=gen), torch.randn(5, 32, generator=gen)
    norm = T5LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        stream, h = t5_ops.rms_norm(x, r, norm.weight, 1e-6)
        assert torch.equal(stream, x + r) and torch.equal(h, norm(x + r))
        a = torch.randn(5, 2 * 24, generator=gen)
        assert torch.equal(t5_ops.gelu_gate(a, 24), NewGELUActivation()(a[:, :24]) * a[:, 24:])
    with pytest.raises(ValueError, match="2 \\* 24"):
        t5_ops.gelu_gate(a[:, :40], 24)


# ---- GPU -------------------------------------------------------------------------------------------------


@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_round_as_the_modules(dtype):
    # The Triton kernels against transformers' modules on the same device and dtype. bf16: the kernels round
    # after every step as the modules' torch ops do, so nearly every element is the same; the few that are
    # not come from float32 sums in another order or a last-bit tanh/rsqrt difference that flips a rounding.
    # float32: as close as float32 allows.
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 4096, device="cuda", generator=gen).to(dtype)
    r = torch.randn(300, 4096, device="cuda", generator=gen).to(dtype)
    norm = T5LayerNorm(4096, eps=1e-6).to("cuda", dtype)
    a = (3 * torch.randn(300, 2 * 2560, device="cuda", generator=gen)).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        stream, h = t5_ops.rms_norm(x, r, norm.weight, 1e-6)
        ref_h = norm(x + r)
        gate, ref_gate = t5_ops.gelu_gate(a, 2560), NewGELUActivation()(a[:, :2560]) * a[:, 2560:]
    assert torch.equal(stream, x + r)
    for what, got, ref in (("norm", h, ref_h), ("gate", gate, ref_gate)):
        assert got.dtype == ref.dtype == dtype
        differ, err = (got != ref).float().mean().item(), rel_err(got, ref)
        if dtype == torch.bfloat16:
            assert differ < 0.02 and err < 1e-3, (what, differ, err)
        else:
            assert err < 1e-6, (what, err)


@needs_cuda_triton
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_fused_forward_on_the_gpu(name):
    model = build(name, "cuda", torch.bfloat16)
    ids, mask = inputs("cuda", length=40)
    expected = {m is None: module_states(model, ids, m) for m in (mask, None)}
    fused = fuse_t5(model)
    for m in (mask, None):
        # bf16: the fused GEMMs may round their sums in another order than the separate ones.
        assert rel_err(fused(ids, m), expected[m is None]) < 1e-2
