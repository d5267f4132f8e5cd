"""LoRA adapters (issue 20) on the native FLUX and Wan DiTs against diffusers' load_lora_weights + set_adapters.

Pixel tolerance: the same as tests/unit/test_pipelines.py (0.5 rounding + 0.02): float32 on the CPU, and the
low-rank term is the same product diffusers' PEFT layers compute, (x A^T) B^T * scale added to the base
output, in a different association (our alpha/rank folded into B; PEFT scales the (M, out) product), which
moves values by ~1e-7 relative: far inside the 1e-5 relative the 0.02 allows for.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffserve.runtime.api import GenerationRequest, InvalidRequest, batch_key
from diffserve.runtime.config import RuntimeConfig
from diffserve.runtime.limits import LimitError, Limits, check_request
from diffserve.runtime.loader import ModelLoadError
from diffserve.runtime.runner import load_runner
from diffserve.testing.tiny_loras import make_tiny_lora
from tests.unit.test_pipelines import _assert_same_picture, _pixels

FLUX_KW = dict(prompt="a red fox", width=48, height=32, num_inference_steps=2, guidance_scale=4.0, seed=3)
WAN_KW = dict(
    prompt="waves", width=32, height=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0, seed=3
)
# A LoRA must visibly change the picture, or the parity tests would pass with it ignored: these random
# adapters move pixels by 15-100 levels (uint8); 8 is well clear of rounding and well below that.
VISIBLE = 8.0


def _frames(result) -> np.ndarray:
    return _pixels(result.images if result.images else result.videos[0])


@pytest.fixture(scope="module")
def flux_loras(tiny_flux_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("flux-loras")
    twins = {
        "style": make_tiny_lora(tiny_flux_dir, d / "style.safetensors", fmt="peft", seed=1),
        "kohya": make_tiny_lora(tiny_flux_dir, d / "kohya.safetensors", fmt="kohya", seed=2),
    }
    return d, twins


@pytest.fixture(scope="module")
def flux(tiny_flux_dir, flux_loras):
    d, _ = flux_loras
    loras = (f"style={d / 'style.safetensors'}", f"kohya={d / 'kohya.safetensors'}")
    return load_runner(RuntimeConfig(str(tiny_flux_dir), "cpu", loras=loras))


@pytest.fixture(scope="module")
def flux_reference(tiny_flux_dir, flux_loras):
    from diffusers import FluxPipeline

    _, twins = flux_loras
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    # diffusers converts kohya FLUX files with FLUX.1's real widths hard-coded, so the tiny kohya file is
    # checked through its PEFT twin (the same factors, alpha folded in): see diffserve/testing/tiny_loras.py
    for name, twin in twins.items():
        pipe.load_lora_weights(dict(twin), adapter_name=name)
    return pipe


def _flux_ref(pipe, names, scales):
    pipe.set_adapters(names, scales)
    kw = {k: v for k, v in FLUX_KW.items() if k not in ("prompt", "seed")}
    out = pipe(FLUX_KW["prompt"], generator=torch.Generator().manual_seed(3), output_type="np", **kw)
    return out.images


def test_flux_lora_matches_diffusers_one_and_two_adapters_and_base_is_untouched(flux, flux_reference):
    base = _pixels(flux.generate(GenerationRequest(**FLUX_KW)).images)
    style = _pixels(flux.generate(GenerationRequest(**FLUX_KW, extra={"lora": {"style": 0.7}})).images)
    _assert_same_picture(style, _flux_ref(flux_reference, ["style"], [0.7]))
    both = flux.generate(GenerationRequest(**FLUX_KW, extra={"lora": {"kohya": 1.0, "style": -0.5}}))
    _assert_same_picture(_pixels(both.images), _flux_ref(flux_reference, ["kohya", "style"], [1.0, -0.5]))
    assert np.abs(style - base).max() > VISIBLE and np.abs(_pixels(both.images) - style).max() > VISIBLE
    # base weights never change: the base model after adapters gives the very same pixels
    again = _pixels(flux.generate(GenerationRequest(**FLUX_KW, extra={"lora": {"style": 0}})).images)
    assert np.array_equal(again, base)


def test_flux_batch_never_mixes_adapter_sets(flux):
    reqs = [
        GenerationRequest(**FLUX_KW, extra={"lora": {"style": 1.0}}),
        GenerationRequest(**{**FLUX_KW, "seed": 4}),
        GenerationRequest(**{**FLUX_KW, "seed": 5}, extra={"lora": {"style": 1.0, "kohya": 0}}),
    ]
    keys = [batch_key(r, "flux", flux.defaults) for r in reqs]
    assert keys[0] != keys[1] and keys[0] == keys[2]  # a zero scale is the same set
    assert (
        batch_key(GenerationRequest(**FLUX_KW, extra={"lora": {"style": 0.5}}), "flux", flux.defaults)
        != keys[0]
    )
    calls = []
    original = flux.pipeline.generate_samples

    def spy(group, **kw):
        calls.append((len(group), [name for name, _ in flux.loras.state.active]))
        return original(group, **kw)

    flux.pipeline.generate_samples = spy
    try:
        outcomes = flux.generate_batch(reqs)
    finally:
        del flux.pipeline.generate_samples
    # one shared forward for the two "style" requests, under "style"; the base request ran alone (a group
    # of one goes through Runner.generate, not generate_samples)
    assert calls == [(2, ["style"])]
    alone = [_pixels(flux.generate(r).images) for r in reqs]
    for outcome, single in zip(outcomes, alone, strict=True):
        # batched samples are what each gets alone up to float rounding (api.batch_key's contract): 1 level
        assert np.abs(_pixels(outcome.images) - single).max() <= 1


def test_flux_fp8_applies_lora_on_quantised_layers(tiny_flux_dir, flux_loras, flux):
    from diffserve.runtime.layers.fp8 import Fp8Linear
    from diffserve.runtime.layers.lora import LoraLinear

    d, _ = flux_loras
    fp8 = load_runner(
        RuntimeConfig(
            str(tiny_flux_dir), "cpu", quantization="fp8", loras=(f"style={d / 'style.safetensors'}",)
        )
    )
    dit = fp8.pipeline.transformer
    qkv = dit.transformer_blocks[0].attn.qkv  # the fused FP8 q|k|v GEMM carries the three LoRAs
    assert isinstance(qkv, LoraLinear) and isinstance(qkv.base, Fp8Linear) and qkv.takes_quantized
    exact = _pixels(flux.generate(GenerationRequest(**FLUX_KW, extra={"lora": {"style": 1.0}})).images)
    base = _pixels(fp8.generate(GenerationRequest(**FLUX_KW)).images)
    with_lora = _pixels(fp8.generate(GenerationRequest(**FLUX_KW, extra={"lora": {"style": 1.0}})).images)
    # FP8 (e4m3, ~3% per GEMM) moves the picture a little; the adapter moves it a lot (VISIBLE). So the FP8
    # LoRA picture is near the float32 LoRA picture and far from the FP8 base one: half the distance is a
    # bound that an ignored adapter (distance ratio ~1) fails and e4m3 rounding (ratio 0.04 here) passes.
    assert np.abs(with_lora - exact).mean() < 0.5 * np.abs(base - exact).mean()
    assert sum(m.weight_reads for m in dit.modules() if type(m) is Fp8Linear) == 0


def test_lora_linear_over_fp8_reads_the_quantised_input_exactly():
    from diffserve.kernels.fp8_quant import quantize_activation
    from diffserve.runtime.layers.fp8 import Fp8Linear, Quantized
    from diffserve.runtime.layers.lora import LoraLinear, LoraState

    gen = torch.Generator().manual_seed(0)
    base = Fp8Linear.from_weight(torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen))
    state = LoraState(2, "cpu")
    layer = LoraLinear(base, state, 4, torch.float32, "cpu")
    a, bt = torch.randn(4, 32, generator=gen), torch.randn(4, 48, generator=gen)
    layer.load_slot(1, "x", a, bt)
    state.set((("x", 1),), {1: 0.75})
    xq, s = quantize_activation(torch.randn(2, 5, 32, generator=gen))
    got = layer(Quantized(xq, s), out_dtype=torch.float32)
    x = xq.double() * s.double()  # the FP8 GEMM's own input, dequantised
    want = (
        base(Quantized(xq, s), out_dtype=torch.float32).double() + 0.75 * (x @ a.double().t()) @ bt.double()
    )
    # float32 GEMMs of K=32 and rank 4 against float64: ~1e-6 relative; 1e-5 leaves margin on any CPU
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def wan_loras(tiny_wan_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("wan-loras")
    make_tiny_lora(tiny_wan_dir, d / "peft.safetensors", fmt="peft", seed=1)
    make_tiny_lora(tiny_wan_dir, d / "kohya.safetensors", fmt="kohya", seed=2)
    return d


def test_wan_lora_matches_diffusers_peft_and_kohya(tiny_wan_dir, wan_loras):
    from diffusers import WanPipeline

    d = wan_loras
    loras = (f"p={d / 'peft.safetensors'}", f"k={d / 'kohya.safetensors'}")
    ours = load_runner(RuntimeConfig(str(tiny_wan_dir), "cpu", loras=loras, max_loras=1))
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(d / "peft.safetensors"), adapter_name="p")
    pipe.load_lora_weights(str(d / "kohya.safetensors"), adapter_name="k")  # diffusers' own kohya reader
    kw = {k: v for k, v in WAN_KW.items() if k not in ("prompt", "seed")}
    base = _frames(ours.generate(GenerationRequest(**WAN_KW)))
    # max_loras=1: "p" then "k" take the one slot in turn (LRU), and "p" comes back
    for names, scales in ((["p"], [0.8]), (["k"], [1.2]), (["p"], [0.8])):
        got = _frames(
            ours.generate(GenerationRequest(**WAN_KW, extra={"lora": dict(zip(names, scales, strict=True))}))
        )
        pipe.set_adapters(names, scales)
        ref = pipe(WAN_KW["prompt"], generator=torch.Generator().manual_seed(3), output_type="np", **kw)
        _assert_same_picture(got, ref.frames[0])
        assert np.abs(got - base).max() > VISIBLE
    with pytest.raises(InvalidRequest, match="at most 1 LoRA adapters at once"):
        ours.generate(GenerationRequest(**WAN_KW, extra={"lora": {"p": 1.0, "k": 1.0}}))


def test_bad_lora_files_and_flags_are_one_line_errors(tiny_flux_dir, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="--lora must be NAME=PATH"):
        RuntimeConfig(loras=("nopath",))
    with pytest.raises(ValueError, match="given twice"):
        RuntimeConfig(loras=("a=x", "a=y"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_runner(RuntimeConfig(str(tiny_flux_dir), "cpu", loras=(f"a={tmp_path / 'none.safetensors'}",)))
    modulation = tmp_path / "mod.safetensors"  # kohya's img_mod: fused into our adaLN GEMV, refused by name
    save_file(
        {
            "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(2, 32),
            "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(192, 2),
        },
        str(modulation),
    )
    with pytest.raises(
        ModelLoadError, match=r"LoRA on transformer_blocks\.0\.norm1\.linear is not supported"
    ):
        load_runner(RuntimeConfig(str(tiny_flux_dir), "cpu", loras=(f"m={modulation}",)))


def test_request_checks_name_the_known_adapters():
    lim = Limits().for_model({"loras": ["style", "kohya"], "max_loras": 1})

    def check(value):
        check_request(GenerationRequest("x", extra={"lora": value}), lim, "image")

    check({"style": 0.5, "kohya": 0})  # a zero scale is not an adapter in use
    with pytest.raises(LimitError, match="unknown LoRA adapter 'nope': known adapters are style, kohya") as e:
        check({"nope": 1})
    assert (e.value.param, e.value.code) == ("lora", "unknown_lora")
    for bad in (math.nan, math.inf, "1", True, None):
        with pytest.raises(LimitError, match="must be a finite number"):
            check({"style": bad})
    with pytest.raises(LimitError, match="must be an object"):
        check(["style"])
    with pytest.raises(LimitError, match="at most 1 adapters at once"):
        check({"style": 1, "kohya": 1})
    with pytest.raises(LimitError, match="this server has no LoRA adapters"):
        check_request(
            GenerationRequest("x", extra={"lora": {"a": 1}}), Limits().for_model({"loras": []}), "image"
        )


def test_graph_key_includes_the_adapter_set():
    from diffserve.runtime.cuda_graphs import state_key
    from diffserve.runtime.layers.lora import LoraState

    state = LoraState(2, "cpu")
    module = torch.nn.Linear(2, 2)
    module.graph_state_key = state.graph_key
    assert state_key(module) == () and state_key(torch.nn.Linear(2, 2)) is None
    state.active = (("a", 0),)
    assert state_key(module) == (("a", 0),)
    assert state_key(module.forward) == (("a", 0),)  # bound methods (the step cache's head/tail) too


# K-append (layers/lora.py LoraLinear._forward_k_append): y = [x | t] @ [W | B_0 | ...]^T + b in one GEMM.
# Float32 bound: each output is one dot product of K = in + S*rank <= 28 terms (plus the bias and the t
# product's own 8-term sums), so |error| <= ~K * 2^-24 * sum|terms| ~ 2e-6 * max|y| here; 1e-5 relative to
# max|y| leaves 5x headroom yet is ~1e4 times smaller than any one adapter's contribution.
K_IN, K_OUT, K_RANK, K_SLOTS = 8, 16, 4, 3


def _k_layer(bias: bool = True):
    from diffserve.runtime.layers.lora import LoraLinear, LoraState

    torch.manual_seed(0)
    state = LoraState(K_SLOTS, "cpu")
    base = torch.nn.Linear(K_IN, K_OUT, bias=bias).requires_grad_(False)  # as a served model's
    layer = LoraLinear(base, state, K_RANK, torch.float32, "cpu")
    assert layer.k_append  # in < out: K-append pays (and is what these tests check)
    return layer


def _factors(r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, K_IN, generator=g), torch.randn(r, K_OUT, generator=g)


def _activate(layer, scales: dict[str, tuple[int, float]]):
    # as LoraManager.activate: sorted (name, slot), scale 0 for every inactive slot
    active = tuple(sorted((n, slot) for n, (slot, _) in scales.items()))
    layer.state.set(active, {slot: s for slot, s in scales.values()})


def _reference(layer, x, terms):
    w, b = layer.base.weight.double(), layer.base.bias
    y = x.double() @ w.t() + (b.double() if b is not None else 0)
    for (a, bt), s in terms:
        y = y + s * (x.double() @ a.double().t()) @ bt.double()
    return y


def _close(y, ref):
    assert y.dtype == torch.float32
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err


@pytest.mark.parametrize("k_append", [True, False])
def test_lora_k_append_matches_float64_reference(k_append):
    layer = _k_layer()
    layer.k_append = k_append  # the addmm_ path must agree on the same slots
    x = torch.randn(2, 5, K_IN)
    one = _factors(K_RANK, 1)
    layer.load_slot(0, "one", *one)
    _activate(layer, {"one": (0, 0.7)})
    _close(layer(x), _reference(layer, x, [(one, 0.7)]))

    # slot 1: an evicted adapter, then one that leaves this layer alone but is active (nonzero scale):
    # K-append reads the whole slot, so it must be zeros
    layer.load_slot(1, "old", *_factors(K_RANK, 2))
    layer.load_slot(1, "old", None, None)
    layer.load_slot(1, "skips", None, None)
    two = _factors(K_RANK, 3)
    layer.load_slot(2, "two", *two)
    _activate(layer, {"one": (0, 0.7), "skips": (1, 1.3), "two": (2, -0.4)})
    ref = _reference(layer, x, [(one, 0.7), (two, -0.4)])
    _close(layer(x), ref)
    out = torch.empty(2, 5, K_OUT)
    assert layer(x, out=out) is out
    _close(out, ref)

    # a rank-2 adapter loaded over a rank-4 one (no eviction call first): rows 2..3 must not leak
    small = _factors(2, 4)
    layer.ranks.pop("one")
    layer.load_slot(0, "small", *small)
    _activate(layer, {"small": (0, 1.1), "two": (2, -0.4)})
    ref = _reference(layer, x, [(small, 1.1), (two, -0.4)])
    _close(layer(x), ref)

    gelu = layer(x, activation="gelu")
    _close(gelu, torch.nn.functional.gelu(ref, approximate="tanh"))

    _activate(layer, {})  # base model: no adapter term at all
    _close(layer(x), _reference(layer, x, []))


def test_lora_k_append_without_bias():
    layer = _k_layer(bias=False)
    x = torch.randn(7, K_IN)
    f = _factors(3, 5)
    layer.load_slot(1, "f", *f)
    _activate(layer, {"f": (1, 0.9)})
    ref = _reference(layer, x, [(f, 0.9)])
    _close(layer(x), ref)
    _close(layer(x, activation="gelu"), torch.nn.functional.gelu(ref, approximate="tanh"))


def test_lora_k_append_holds_the_base_weight_once():
    from diffserve.runtime.layers.lora import LoraState, wrap_linears
    from diffserve.runtime.models.base import fuse_linears

    layer = _k_layer()
    ptr = layer.wcat.untyped_storage().data_ptr()
    assert layer.base.weight.untyped_storage().data_ptr() == ptr
    assert layer.lora_bt.untyped_storage().data_ptr() == ptr
    assert layer.wcat.shape == (K_OUT, 64)  # in + slots*rank = 20 columns, rows padded to 64 (128 bytes)

    # a fused q|k|v projection: its members' row views move into wcat too
    owner = torch.nn.Module()
    for n in ("to_q", "to_k", "to_v"):
        owner.add_module(n, torch.nn.Linear(K_IN, K_IN))
    fuse_linears(owner, ("to_q", "to_k", "to_v"), "qkv")
    weight = owner.qkv_weight.clone()
    lora = wrap_linears(owner, {"qkv": K_RANK}, LoraState(2, "cpu"), torch.float32)["qkv"]
    ptr = lora.wcat.untyped_storage().data_ptr()
    assert torch.equal(lora.base.weight, weight)
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        member = owner.get_submodule(n).weight
        assert member.untyped_storage().data_ptr() == ptr
        assert torch.equal(member, weight[i * K_IN : (i + 1) * K_IN])


def test_lora_linear_concat_split_adds_the_low_rank_terms():
    """mlp.linear_concat's split GEMMs (the CUDA path of FLUX's single-block output projection) over a LoRA
    layer: each part against its columns of W and of A, never concatenated; the same function as the layer
    called on the concatenation (float32 bound as above: sums of <= 28 terms)."""
    from diffserve.runtime.layers.mlp import linear_concat

    layer = _k_layer()
    a, b = _factors(K_RANK, 1), _factors(K_RANK, 2)
    layer.load_slot(0, "a", *a)
    layer.load_slot(2, "b", *b)
    _activate(layer, {"a": (0, 0.7), "b": (2, -1.2)})
    parts = [torch.randn(3, 5, 3), torch.randn(3, 5, K_IN - 3)]
    x = torch.cat(parts, dim=-1)
    ref = _reference(layer, x, [(a, 0.7), (b, -1.2)])
    _close(linear_concat(parts, layer, split=True), ref)
    _close(linear_concat(parts, layer, split=False), ref)
    _activate(layer, {})
    _close(linear_concat(parts, layer, split=True), _reference(layer, x, []))


def test_lora_wide_input_skips_the_join_and_never_writes_a_strangers_columns():
    """A producer writing into input_buffer's left columns: the K-append GEMM reads [x | t] there (no cat),
    with the same result as the joined path; an input that merely has room to its right (a column slice of
    another tensor) is joined as before and its neighbours are left alone. Float32 bound as above."""
    layer = _k_layer()
    one = _factors(K_RANK, 1)
    layer.load_slot(1, "one", *one)
    _activate(layer, {"one": (1, 0.6)})
    x = torch.randn(2, 5, K_IN)
    ref = _reference(layer, x, [(one, 0.6)])
    view = layer.input_buffer(x)
    assert view.shape == x.shape and view.stride(1) >= K_IN + 2 * K_RANK  # slots 0..1 read
    view.copy_(x)
    cat = torch.cat
    try:
        torch.cat = lambda *a, **k: pytest.fail("joined a wide input")  # noqa: ARG005
        _close(layer(view), ref)
    finally:
        torch.cat = cat
    stranger = torch.randn(2, 5, K_IN + 2 * K_RANK)
    before = stranger.clone()
    _close(layer(stranger[..., :K_IN]), _reference(layer, stranger[..., :K_IN], [(one, 0.6)]))
    assert torch.equal(stranger, before)
    _activate(layer, {})
    assert layer.input_buffer(x) is None  # no adapter here: nothing to make room for


def test_lora_shared_input_one_buffer_one_down_projection(monkeypatch):
    """share_input (FLUX's single block: the MLP input and q|k|v projections both read h): input_buffer
    gives one wide buffer for both, the adaLN pass writes h there once, and the first of them called
    computes both layers' t in one down-projection (no join); each layer gives what it gives alone, in
    either call order, with different ranks, an adapter that touches one layer only, an empty slot below
    an active one, and a layer called on other rows of h (FLUX's last block: it joins its own).
    Float32 bound as above."""
    from diffserve.runtime.layers import lora
    from diffserve.runtime.layers.modulation import residual_norm_modulate

    torch.manual_seed(0)
    state = lora.LoraState(K_SLOTS, "cpu")
    outs, ranks = (2 * K_OUT, K_OUT), (K_RANK, 2)  # the wider layer first, as share_input asks
    layers = [
        lora.LoraLinear(torch.nn.Linear(K_IN, n).requires_grad_(False), state, r, torch.float32, "cpu")
        for n, r in zip(outs, ranks, strict=True)
    ]
    weights = [layer.base.weight.clone() for layer in layers]
    lora.share_input(layers)
    assert layers[0].shared is layers[1].shared is not None
    assert all(torch.equal(layer.base.weight, w) for layer, w in zip(layers, weights, strict=True))

    def factors(r, n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(r, K_IN, generator=g), torch.randn(r, n, generator=g)

    both = [factors(r, n, seed) for r, n, seed in zip(ranks, outs, (1, 2), strict=True)]
    only1 = factors(ranks[1], outs[1], 3)
    for layer, f in zip(layers, both, strict=True):
        layer.load_slot(0, "both", *f)
    layers[0].load_slot(2, "only1", None, None)  # leaves layer 0 alone
    layers[1].load_slot(2, "only1", *only1)
    _activate(layers[0], {"both": (0, 0.6), "only1": (2, -1.1)})  # slot 1: empty
    terms = [[(both[0], 0.6)], [(both[1], 0.6), (only1, -1.1)]]

    down = lora.lora_down
    calls = []

    def counted(parts, a, out, copy_to=None):
        calls.append(copy_to is not None)
        return down(parts, a, out, copy_to)

    monkeypatch.setattr(lora, "lora_down", counted)
    for order, active in (((0, 1), "both"), ((1, 0), "both"), ((0, 1), "only1")):
        if active == "only1":  # layer 0 has no term: its base GEMM reads h in place
            _activate(layers[0], {"only1": (2, -1.1)})
            terms = [[], [(only1, -1.1)]]
        x, y = torch.randn(2, 5, K_IN), torch.randn(2, 5, K_IN)
        gate, shift, scale = (torch.randn(2, 1, K_IN) for _ in range(3))
        _, h_ref = residual_norm_modulate(x, y, gate, shift, scale)
        buf = lora.input_buffer([torch.nn.Identity(), layers[1], layers[0]], x)  # one buffer for both
        _, h = residual_norm_modulate(x, y, gate, shift, scale, out=buf)
        assert h is buf and torch.equal(h, h_ref)
        calls.clear()
        for i in order:
            _close(layers[i](h), _reference(layers[i], h_ref, terms[i]))
        assert calls == [False], calls  # one down-projection, no join

    _activate(layers[0], {"both": (0, 0.6), "only1": (2, -1.1)})
    terms = [[(both[0], 0.6)], [(both[1], 0.6), (only1, -1.1)]]
    # FLUX's last block: layer 1 gets the buffer, layer 0 reads rows of h from token 2 on and joins them
    buf = lora.input_buffer([layers[1]], x)
    buf.copy_(x)
    calls.clear()
    _close(layers[0](buf[:, 2:]), _reference(layers[0], x[:, 2:], terms[0]))
    _close(layers[1](buf), _reference(layers[1], x, terms[1]))
    assert calls == [True, False], calls

    _activate(layers[0], {})  # the base model: no buffers, no low-rank term
    assert lora.input_buffer(layers, x) is None
    for layer in layers:
        _close(layer(x), _reference(layer, x, []))


def test_lora_downs_together_then_each_call_runs_its_gemm_only(monkeypatch):
    """downs_together (FLUX's dual block: image and text twins): the down-projections of the coming calls
    run first, in one lora_downs, a wide input's t into its buffer and a plain input joined; the calls on
    those inputs then run no down-projection and give what they give alone. A call on another input
    than announced computes its own. Float32 bound as above."""
    from diffserve.runtime.layers import lora

    torch.manual_seed(0)
    state = lora.LoraState(K_SLOTS, "cpu")
    layers = [
        lora.LoraLinear(
            torch.nn.Linear(K_IN, K_OUT).requires_grad_(False), state, K_RANK, torch.float32, "cpu"
        )
        for _ in range(3)
    ]
    factors = [_factors(K_RANK, seed) for seed in (1, 2, 3)]
    for layer, f in zip(layers, factors, strict=True):
        layer.load_slot(1, "one", *f)
    _activate(layers[0], {"one": (1, 0.6)})
    x = [torch.randn(2, 5, K_IN), torch.randn(3, K_IN), torch.randn(4, K_IN)]
    wide = lora.input_buffer([layers[0]], x[0])
    wide.copy_(x[0])
    inputs = [wide, x[1], x[2]]
    batches = []
    downs = lora.lora_downs

    def counted(jobs):
        batches.append([copy_to is not None for *_, copy_to in jobs])
        downs(jobs)

    monkeypatch.setattr(lora, "lora_downs", counted)
    lora.downs_together([(layers[0], inputs[0]), (torch.nn.Identity(), x[1]), (layers[1], inputs[1])])
    assert batches == [[False, True]]  # one call for both: the wide input's t, the plain input's join
    monkeypatch.setattr(lora, "lora_down", lambda *a, **k: pytest.fail("a down-projection ran again"))
    for i in (0, 1):
        _close(layers[i](inputs[i]), _reference(layers[i], x[i], [(factors[i], 0.6)]))
    monkeypatch.undo()
    lora.downs_together([(layers[2], x[2])])
    other = torch.randn(4, K_IN)  # not the announced input: computed, not taken from the ready buffer
    _close(layers[2](other), _reference(layers[2], other, [(factors[2], 0.6)]))


def test_lora_chain_hands_a_wide_output_on():
    """FeedForward with LoRA on both projections (chained by wrap_linears): the input projection writes
    [GELU(y) | 0] and the output projection runs K-append over it, for FeedForward and for linear_concat's
    split last part; the same function as the float64 formula. Scales changed between batches, and a slot
    reloaded at unchanged scales, are seen (LoraState.set rewrites the scaled A copies)."""
    from diffserve.runtime.layers.lora import LoraState, wrap_linears
    from diffserve.runtime.layers.mlp import FeedForward, linear_concat

    torch.manual_seed(0)
    ff = FeedForward(K_IN, K_OUT).requires_grad_(False)
    state = LoraState(2, "cpu")
    layers = wrap_linears(ff, {"net.0.proj": K_RANK, "net.2": K_RANK}, state, torch.float32)
    proj_in, proj_out = layers["net.0.proj"], layers["net.2"]
    assert proj_in.next is proj_out and proj_in.pad >= 2 * K_RANK
    g = torch.Generator().manual_seed(7)
    f_in = torch.randn(K_RANK, K_IN, generator=g), torch.randn(K_RANK, K_OUT, generator=g)
    f_out = torch.randn(K_RANK, K_OUT, generator=g), torch.randn(K_RANK, K_IN, generator=g)
    proj_in.load_slot(0, "a", *f_in)
    proj_out.load_slot(0, "a", *f_out)
    x = torch.randn(3, 4, K_IN, generator=g)

    def want(s):
        w1, b1 = proj_in.base.weight.double(), proj_in.base.bias.double()
        h = x.double() @ w1.t() + b1 + s * (x.double() @ f_in[0].double().t()) @ f_in[1].double()
        h = torch.nn.functional.gelu(h, approximate="tanh")
        w2, b2 = proj_out.base.weight.double(), proj_out.base.bias.double()
        return h, h @ w2.t() + b2 + s * (h @ f_out[0].double().t()) @ f_out[1].double()

    for scale in (0.8, -1.5):
        state.set((("a", 0),), {0: scale})
        hidden, y = want(scale)
        got_h = ff.hidden(x)
        assert got_h.stride(-2) == K_OUT + proj_in.pad  # the wide output, handed on
        _close(got_h, hidden)
        _close(proj_out(got_h), y)
        _close(ff(x), y)
        # the split form (FLUX's single block): another part first, the chained producer's output last
        h = ff.hidden(x)
        parts = [h[..., :5].contiguous(), h[..., 5:]]  # the last part is not the wide buffer's start
        _close(linear_concat(parts, proj_out, split=True), y)
    g2 = torch.Generator().manual_seed(8)
    f_out = torch.randn(K_RANK, K_OUT, generator=g2), torch.randn(K_RANK, K_IN, generator=g2)
    proj_out.load_slot(0, "a", *f_out)  # reloaded, same scale: the scaled copy must follow
    state.set((("a", 0),), {0: -1.5})
    _close(ff(x), want(-1.5)[1])
    state.set((), {})  # base model: the input projection keeps its GELU epilogue, no padding
    base = proj_out.base(torch.nn.functional.gelu(proj_in.base(x), approximate="tanh"))
    assert ff.hidden(x).is_contiguous()
    _close(ff(x), base.double())


def test_lora_chain_into_the_last_part_of_a_split_projection():
    """FLUX's single block: GELU(proj_mlp(x)) is the last part of proj_out's input [attn | mlp]. Chained, the
    split GEMM of that part runs K-append over the producer's wide output (the wide buffer is taken);
    the result is the float64 formula of the concatenation. Float32 bound as above."""
    from diffserve.runtime.layers.lora import LoraState, wrap_linears
    from diffserve.runtime.layers.mlp import linear_concat

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_mlp = torch.nn.Linear(K_IN, 12)
            self.proj_out = torch.nn.Linear(4 + 12, K_OUT)

        def lora_chains(self):
            return (("proj_mlp", "proj_out"),)

    torch.manual_seed(1)
    block = Block().requires_grad_(False)
    state = LoraState(2, "cpu")
    layers = wrap_linears(block, {"proj_mlp": K_RANK, "proj_out": K_RANK}, state, torch.float32)
    mlp, out = layers["proj_mlp"], layers["proj_out"]
    assert mlp.next is out
    g = torch.Generator().manual_seed(3)
    fa = torch.randn(K_RANK, 16, generator=g), torch.randn(K_RANK, K_OUT, generator=g)
    out.load_slot(1, "s", *fa)
    mlp.load_slot(1, "s", torch.randn(K_RANK, K_IN, generator=g), torch.randn(K_RANK, 12, generator=g))
    state.set((("s", 1),), {1: 0.9})
    x, attn = torch.randn(2, 3, K_IN, generator=g), torch.randn(2, 3, 4, generator=g)
    hidden = mlp(x, activation="gelu")
    assert hidden.stride(-2) > 12  # the wide output
    taken = []
    take = out._take
    out._take = lambda t: taken.append(take(t)) or taken[-1]
    got = linear_concat([attn, hidden], out, split=True)
    assert taken and taken[0] is not None  # K-append over the wide buffer, no separate addmm_
    cat = torch.cat([attn, hidden], dim=-1).double()
    w, b = out.base.weight.double(), out.base.bias.double()
    _close(got, cat @ w.t() + b + 0.9 * (cat @ fa[0].double().t()) @ fa[1].double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flux_lora_on_cuda_kernels_match_the_torch_path(tiny_flux_dir, flux_loras):
    """On CUDA the layers' down-projections (and joins) run kernels/low_rank.py's Triton kernel, under CUDA
    graphs; the same requests with the fused ops off (torch's matmuls, the path the CPU parity above holds
    to diffusers) give the same pixels: float32 both ways, ieee float32 dots, so 1 level of rounding."""
    from diffserve.kernels import fused_ops

    d, _ = flux_loras
    loras = (f"style={d / 'style.safetensors'}", f"kohya={d / 'kohya.safetensors'}")
    reqs = [
        GenerationRequest(**FLUX_KW, extra={"lora": {"style": 0.7}}),
        GenerationRequest(**FLUX_KW, extra={"lora": {"kohya": 1.0, "style": -0.5}}),
        GenerationRequest(**FLUX_KW),
    ]
    pictures = {}
    for fused in (True, False):  # a runner each: CUDA graphs captured with the kernels replay them
        fused_ops.set_fused_ops(fused)
        try:
            runner = load_runner(RuntimeConfig(str(tiny_flux_dir), "cuda", dtype="float32", loras=loras))
            pictures[fused] = [_pixels(runner.generate(r).images) for r in reqs]
        finally:
            fused_ops.set_fused_ops(None)
    fast, slow = pictures[True], pictures[False]
    for a, b in zip(fast, slow, strict=True):
        assert np.abs(a - b).max() <= 1
    assert np.abs(fast[0] - fast[2]).max() > VISIBLE and np.abs(fast[1] - fast[0]).max() > VISIBLE


def test_lora_n_append_writes_y_and_t_in_one_gemm():
    """N-append (LoraLinear.n_append; FLUX's single-block output projection): W and the scaled A share one
    buffer [W; scale A] (the weight held once, the scaled A rewritten in place by LoraState.set), one GEMM
    writes [y | t] and t B^T is added after: the same function as the reference, called directly and
    through linear_concat's split GEMMs; with no active adapter, the base GEMM alone. Float32 bound as above."""
    from diffserve.runtime.layers.lora import LoraLinear, LoraState
    from diffserve.runtime.layers.mlp import linear_concat

    torch.manual_seed(0)
    state = LoraState(K_SLOTS, "cpu")
    base = torch.nn.Linear(K_OUT, K_IN).requires_grad_(False)  # wider in than out: not K-append
    layer = LoraLinear(base, state, K_RANK, torch.float32, "cpu")
    layer.n_append()
    assert layer.ncat is not None and layer.wcat is None
    assert layer.base.weight.data_ptr() == layer.ncat.data_ptr()
    assert layer.lora_as.untyped_storage().data_ptr() == layer.ncat.untyped_storage().data_ptr()
    assert layer.lora_bt.is_contiguous()  # as lora_up reads it: no copy per call
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(K_RANK, K_OUT, generator=g), torch.randn(K_RANK, K_IN, generator=g))
    a2, b2 = (torch.randn(2, K_OUT, generator=g), torch.randn(2, K_IN, generator=g))
    layer.load_slot(0, "a", a, b)
    layer.load_slot(1, "b", a2, b2)
    _activate(layer, {"a": (0, 0.7), "b": (1, -1.2)})
    parts = [torch.randn(3, 5, 6), torch.randn(3, 5, K_OUT - 6)]
    x = torch.cat(parts, dim=-1)
    ref = _reference(layer, x, [((a, b), 0.7), ((a2, b2), -1.2)])
    _close(layer(x), ref)
    _close(linear_concat(parts, layer, split=True), ref)
    _activate(layer, {"b": (1, 0.5)})  # another scale: the scaled A rewritten in place
    _close(linear_concat(parts, layer, split=True), _reference(layer, x, [((a2, b2), 0.5)]))
    _activate(layer, {})
    assert layer.n_rows() == 0
    _close(layer(x), _reference(layer, x, []))
