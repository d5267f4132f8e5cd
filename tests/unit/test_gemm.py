"""kernels.gemm: the DiT linear layers. On the CPU every mode must be exactly the torch call the blocks made
before; on CUDA the tuned cuBLASLt path must agree with torch within bf16 rounding, repeat bit for bit,
replay identically in a CUDA graph, and step aside (to torch) where it cannot run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffserve.kernels import gemm
from diffserve.runtime.layers.linear import Linear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh():
    gemm.clear()
    gemm.set_gemm_tuning(None)
    yield
    gemm.set_gemm_tuning(None)


def _operands(m, k, n, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype)
    return x, w, b


def test_alignment():
    assert gemm.alignment(0) == 256 and gemm.alignment(512) == 256 and gemm.alignment(4096 + 16) == 16
    assert gemm.alignment(6) == 2 and gemm.alignment(8) == 8


def test_env_switch(monkeypatch):
    monkeypatch.setenv(gemm.ENV_VAR, "0")
    assert not gemm.gemm_tuning_enabled()
    monkeypatch.setenv(gemm.ENV_VAR, "1")
    assert gemm.gemm_tuning_enabled()
    gemm.set_gemm_tuning(False)
    assert not gemm.gemm_tuning_enabled()


def test_cpu_modes_are_the_torch_calls():
    x, w, b = _operands(2 * 7, 24, 40)
    x3 = x.view(2, 7, 24)
    assert torch.equal(gemm.linear(x3, w, b), F.linear(x3, w, b))
    assert torch.equal(gemm.linear(x3, w), F.linear(x3, w))
    assert torch.equal(gemm.linear(x3, w, b, gelu=True), F.gelu(F.linear(x3, w, b), approximate="tanh"))
    # out: a block of rows of a wider buffer, left as it is around the block
    buf = torch.full((20, 64), 7.0)
    got = gemm.linear(x, w, b, out=buf[3:17, :40])
    assert got.data_ptr() == buf[3:17].data_ptr()
    assert torch.equal(buf[3:17, :40], torch.addmm(b, x, w.t()))
    assert (buf[:3] == 7).all() and (buf[17:] == 7).all() and (buf[:, 40:] == 7).all()
    # accumulate with a column slice of a wider weight (linear_concat's split projection)
    wide = torch.randn(40, 50)
    acc = F.linear(x, w, b)
    expect = acc.clone().addmm_(torch.ones(14, 26), wide[:, 24:].t())
    gemm.linear(torch.ones(14, 26), wide[:, 24:], out=acc, accumulate=True)
    assert torch.equal(acc, expect)


def test_bad_calls_are_clear_errors():
    x, w, b = _operands(4, 8, 6)
    with pytest.raises(ValueError, match="accumulate"):
        gemm.linear(x, w, accumulate=True)
    with pytest.raises(ValueError, match="accumulate"):
        gemm.linear(x, w, b, out=torch.empty(4, 6), accumulate=True)
    with pytest.raises(ValueError, match="features"):
        gemm.linear(torch.randn(4, 9), w)
    with pytest.raises(ValueError, match="out must hold"):
        gemm.linear(x, w, out=torch.empty(5, 6))


def test_linear_module_keeps_nn_linear_state_dict():
    ref = torch.nn.Linear(12, 5)
    ours = Linear(12, 5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(ours(x), ref(x))


# ------------------------------------------------------------------------------------------------ CUDA


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


MODES = ["bias", "plain", "gelu_bias", "gelu", "out_rows", "accumulate", "weight_slice", "batched_3d"]


def _call(mode, x, w, b):
    """(ours, reference in float32, torch's bf16 call) for one mode."""
    xf, wf, bf = x.float(), w.float(), b.float()
    if mode == "bias":
        return gemm.linear(x, w, b), F.linear(xf, wf, bf), F.linear(x, w, b)
    if mode == "plain":
        return gemm.linear(x, w), F.linear(xf, wf), F.linear(x, w)
    if mode == "gelu_bias":
        ref = F.gelu(F.linear(xf, wf, bf), approximate="tanh")
        return gemm.linear(x, w, b, gelu=True), ref, torch._addmm_activation(b, x, w.t(), use_gelu=True)
    if mode == "gelu":
        ref = F.gelu(F.linear(xf, wf), approximate="tanh")
        return gemm.linear(x, w, gelu=True), ref, F.gelu(F.linear(x, w), approximate="tanh")
    if mode == "out_rows":
        buf = torch.zeros(x.shape[0] + 64, w.shape[0], device=x.device, dtype=x.dtype)
        gemm.linear(x, w, b, out=buf[64:])
        assert (buf[:64] == 0).all()
        return buf[64:], F.linear(xf, wf, bf), F.linear(x, w, b)
    if mode == "accumulate":
        start = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
        out = start.clone()
        gemm.linear(x, w, out=out, accumulate=True)
        return out, start.float() + xf @ wf.t(), start.clone().addmm_(x, w.t())
    if mode == "weight_slice":
        wide = torch.cat([w, w[:, :64]], dim=1)  # w sits in the first K columns of a wider matrix
        return gemm.linear(x, wide[:, : w.shape[1]], b), F.linear(xf, wf, bf), F.linear(x, w, b)
    if mode == "batched_3d":
        x3 = x.view(2, -1, x.shape[-1])
        return gemm.linear(x3, w, b).flatten(0, 1), F.linear(xf, wf, bf), F.linear(x, w, b)
    raise AssertionError(mode)


@cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_tuned_path_matches_torch(mode, dtype):
    x, w, b = _operands(512, 768, 1024, "cuda", dtype)
    before = gemm.tuned_problems()
    ours, ref, theirs = _call(mode, x, w, b)
    if gemm.lt.library() is None:
        pytest.skip(f"needs cuBLASLt: {gemm.lt.library_error()}")
    assert gemm.tuned_problems() == before + 1  # the tuned path ran, not the fallback
    assert _rel(ours, ref) < 1e-2
    # as close to float32 as torch's own call, and within bf16 rounding of it
    assert _rel(ours, ref) < 1.5 * _rel(theirs, ref) + 1e-4
    assert _rel(ours, theirs) < 8e-3
    again, _, _ = _call(mode, x, w, b)
    assert torch.equal(ours, again)  # the same algorithm every call: bit-identical


@cuda
def test_cuda_graph_replay_is_bit_identical():
    x, w, b = _operands(1024, 512, 1536, "cuda", torch.bfloat16)
    eager = gemm.linear(x, w, b, gelu=True)  # tunes (warm-up, as GraphedForward does)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        captured = gemm.linear(x, w, b, gelu=True)
    x.mul_(0.5)  # replay reads the new input
    eager = gemm.linear(x, w, b, gelu=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@cuda
def test_cuda_problem_first_seen_in_capture_takes_torch_path():
    x, w, b = _operands(256, 512, 512, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    F.linear(x, w, b)  # warm torch's own handle outside the capture
    with torch.cuda.graph(graph, stream=stream):
        y = gemm.linear(x, w, b)
    graph.replay()
    torch.cuda.synchronize()
    assert gemm.tuned_problems() == 0
    assert torch.equal(y, F.linear(x, w, b))


@cuda
def test_cuda_fallbacks_are_torch_exactly():
    x, w, b = _operands(256, 512, 512, "cuda", torch.bfloat16)
    gemm.set_gemm_tuning(False)
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    gemm.set_gemm_tuning(None)
    # float32 and a misaligned input (one element in) are not ours either
    xf, wf, bf = x.float(), w.float(), b.float()
    assert torch.equal(gemm.linear(xf, wf, bf), F.linear(xf, wf, bf))
    flat = torch.randn(256 * 512 + 1, device="cuda", dtype=torch.bfloat16)
    xm = flat[1:].view(256, 512)
    assert torch.equal(gemm.linear(xm, w, b), F.linear(xm, w, b))
    assert gemm.tuned_problems() == 0
