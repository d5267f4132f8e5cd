"""CUDA graphs for the DiT forward (diffserve/runtime/cuda_graphs.py) and the sync-free denoising loop.

On the CPU: a GraphedForward is exactly the wrapped callable; which calls may become graphs and how they are
keyed; the cache policy (LRU eviction, a failed capture falls back to eager once and for all, a forward's
own errors propagate) with the capture itself replaced by a stand-in.
On a CUDA GPU: graphed outputs are bit-identical to eager ones for the tiny FLUX and Wan DiTs, follow new
inputs, survive a second call (CFG), one graph per shape, eviction; whole generations give the same pixels
with and without graphs; the denoising loop runs under torch's sync check, which a syncing predict trips.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from diffserve.runtime import cuda_graphs
from diffserve.runtime.api import GenerationRequest
from diffserve.runtime.cuda_graphs import GraphedForward, graph_key, why_eager
from diffserve.runtime.pipelines import stages
from diffserve.runtime.runner import load_runner

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---- CPU: the plain call --------------------------------------------------------------------------------


def test_cpu_call_is_the_plain_call():
    calls = []
    result = (torch.ones(2),)

    def fn(*args, **kwargs):
        calls.append((args, kwargs))
        return result

    graphed = GraphedForward(fn)
    x = torch.zeros(3)
    assert graphed(x=x, flag=True) is result  # the very object, no clone
    assert graphed(x) is result  # positional arguments pass through too
    assert calls == [((), {"x": x, "flag": True}), ((x,), {})]
    assert (graphed.eager_calls, graphed.captures, graphed.replays) == (2, 0, 0)
    assert not graphed.graphs and not graphed.uncapturable


def test_cpu_pipeline_runs_the_module_itself(tiny_flux_dir):
    runner = load_runner(str(tiny_flux_dir), device="cpu")
    dit = runner.pipeline.dit
    assert isinstance(dit, GraphedForward) and dit.fn is runner.pipeline.transformer
    runner.generate(GenerationRequest("x", width=32, height=32, num_inference_steps=3, seed=0))
    assert (dit.eager_calls, dit.captures, dit.replays) == (3, 0, 0)


def test_why_eager(monkeypatch):
    x = torch.zeros(2)
    assert "CUDA" in why_eager((), {"x": x})
    assert "CUDA" in why_eager((), {"x": x.to("meta")})
    assert why_eager((), {"flag": True}) == "no tensor arguments"
    assert "positional" in why_eager((x,), {})
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "0")  # the switch wins over everything else
    assert why_eager((), {"x": x}) == "DIFFSERVE_CUDA_GRAPHS=0"
    for on in ("1", "yes", ""):
        monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, on)
        assert cuda_graphs.graphs_enabled()
    monkeypatch.delenv(cuda_graphs.GRAPHS_ENV)
    assert cuda_graphs.graphs_enabled()  # default on


def test_plain_values_only():
    plain = cuda_graphs._plain
    assert all(plain(v) for v in (None, True, 3, 0.5, "x", torch.float32, (1, (2, "a"))))
    # A tensor inside a container would be baked into the graph by address: never plain.
    assert not any(plain(v) for v in ([1], {"a": 1}, {1}, (1, [2]), (torch.zeros(1),), torch.zeros(1)))


def test_graph_key_is_the_layout_not_the_values():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    assert graph_key({"x": a, "n": 1}) == graph_key({"n": 1, "x": b})  # values and order do not matter
    different = [
        {"x": torch.zeros(3, 2), "n": 1},  # shape
        {"x": a.double(), "n": 1},  # dtype
        {"x": torch.zeros(3, 2).t(), "n": 1},  # same shape, other strides
        {"x": a, "n": 2},  # a non-tensor value
        {"y": a, "n": 1},  # a name
    ]
    keys = {graph_key(kw) for kw in different}
    assert len(keys) == len(different) and graph_key({"x": a, "n": 1}) not in keys
    with torch.inference_mode():  # a graph captured in inference mode holds inference tensors
        inference = graph_key({"x": a, "n": 1})
    assert inference != graph_key({"x": a, "n": 1})


def test_no_host_sync_is_inert_off_cuda(monkeypatch):
    monkeypatch.setenv(cuda_graphs.CHECK_SYNC_ENV, "1")
    assert cuda_graphs.check_sync_enabled()
    with cuda_graphs.no_host_sync("cpu"), cuda_graphs.sync_allowed():
        assert torch.ones(2).sum().item() == 2.0  # a "sync" on the CPU is just a read
    monkeypatch.setenv(cuda_graphs.CHECK_SYNC_ENV, "0")
    assert not cuda_graphs.check_sync_enabled()


# ---- CPU: the cache policy, with the capture replaced by a stand-in -------------------------------------


@pytest.fixture
def fake_capture(monkeypatch):
    """CapturedForward's life cycle without a GPU: 'replay' calls the function; records what happened."""

    class Fake:
        made, released = [], []
        fail: Exception | None = None  # raised by capture()

        def __init__(self, kwargs):
            self.fn = None
            Fake.made.append(self)

        def warm_up(self, fn, kwargs):
            return fn(**kwargs)

        def capture(self, fn):
            if Fake.fail is not None:
                raise Fake.fail
            self.fn = fn

        def __call__(self, kwargs):
            return self.fn(**kwargs)

        def release(self):
            Fake.released.append(self)

    monkeypatch.setattr(cuda_graphs, "CapturedForward", Fake)
    monkeypatch.setattr(cuda_graphs, "why_eager", lambda args, kwargs: "positional" if args else None)
    return Fake


def _double(x):
    return (x * 2,)


def test_lru_keeps_the_most_recent_graphs(fake_capture):
    graphed = GraphedForward(_double, max_graphs=2)
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    for x in (a, b, a, c):  # a was used after b, so b is the least recent when c arrives
        assert torch.equal(graphed(x=x)[0], x * 2)
    first_a, first_b, first_c = fake_capture.made
    assert fake_capture.released == [first_b]
    assert list(graphed.graphs.values()) == [first_a, first_c]
    graphed(x=b)  # b again: a new capture, and now a is the least recent
    assert fake_capture.released == [first_b, first_a]
    assert (graphed.captures, graphed.replays, graphed.eager_calls) == (4, 5, 0)
    graphed.reset()
    assert not graphed.graphs and len(fake_capture.released) == 4
    with pytest.raises(ValueError, match="at least 1"):
        GraphedForward(_double, max_graphs=0)


def test_failed_capture_warns_once_and_runs_eagerly(fake_capture, caplog):
    fake_capture.fail = RuntimeError("operation not permitted when stream is capturing\nmore detail")
    graphed = GraphedForward(_double)
    x = torch.arange(3.0)
    with caplog.at_level(logging.WARNING, logger="diffserve.runtime.cuda_graphs"):
        outs = [graphed(x=x)[0] for _ in range(3)]
    assert all(torch.equal(o, x * 2) for o in outs)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "operation not permitted when stream is capturing" in warnings[0]
    assert "more detail" not in warnings[0]
    assert len(fake_capture.made) == 1  # never tried again for these inputs
    assert (graphed.captures, graphed.replays, graphed.eager_calls) == (0, 0, 3)
    assert list(graphed.uncapturable.values()) == [
        "RuntimeError: operation not permitted when stream is capturing"
    ]
    fake_capture.fail = None
    assert torch.equal(graphed(x=torch.zeros(4))[0], torch.zeros(4))  # other inputs still get a graph
    assert graphed.captures == 1


def test_out_of_memory_capture_frees_the_other_graphs(fake_capture):
    # The cached graphs' pools may be what leaves the eager call no room: an OOM at capture drops them all.
    graphed = GraphedForward(_double)
    small, big = torch.zeros(1), torch.zeros(5)
    graphed(x=small)
    assert graphed.captures == 1 and len(graphed.graphs) == 1
    fake_capture.fail = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    assert torch.equal(graphed(x=big)[0], big * 2)  # ran eagerly
    assert not graphed.graphs and fake_capture.made[0] in fake_capture.released
    assert list(graphed.uncapturable.values()) == [
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB"
    ]
    fake_capture.fail = None
    graphed(x=small)  # recaptured when its layout comes back
    assert graphed.captures == 2


def test_pipeline_out_of_memory_drops_its_graphs_and_retries_once(fake_capture, caplog):
    # A generation that runs out of memory while graphs hold pools is retried once, with graphs off for
    # good; without graphs to free, the error is the caller's (the server answers out_of_memory).
    from diffserve.runtime.api import GenerationResult
    from diffserve.runtime.pipelines.base import NativePipeline

    class Pipeline(NativePipeline):
        family, task = "test", "image"

        def setup(self):
            self.defaults, self.dit, self.attempts, self.fail = {}, GraphedForward(_double), [], 1

        def plan(self, req):
            return req

        def run(self, plan, timings, on_step, should_cancel):
            out = self.dit(x=torch.ones(2))[0] if self.fail < 9 else None
            self.attempts.append(self.dit.disabled)
            if len(self.attempts) <= self.fail:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (VAE decode)")
            return GenerationResult(images=[out], width=1, height=1, seed=0)

    pipe = Pipeline({}, {}, "cpu")
    with caplog.at_level(logging.WARNING, logger="diffserve.runtime.cuda_graphs"):
        result = pipe(GenerationRequest("x"))
    assert torch.equal(result.images[0], torch.full((2,), 2.0))
    assert pipe.attempts == [None, "a generation ran out of memory with graphs cached"]
    assert not pipe.dit.graphs and fake_capture.made[0] in fake_capture.released
    assert (pipe.dit.captures, pipe.dit.eager_calls) == (1, 1)  # the retry ran eagerly
    assert "CUDA graphs of" in caplog.text
    pipe(GenerationRequest("x"))  # later generations stay eager: no new capture
    assert pipe.dit.captures == 1

    for fail in (2, 9):  # a second OOM (graphs already off), or an OOM with nothing captured: propagates
        pipe = Pipeline({}, {}, "cpu")
        pipe.fail = fail
        with pytest.raises(torch.OutOfMemoryError):
            pipe(GenerationRequest("x"))
        assert len(pipe.attempts) == (2 if fail == 2 else 1)


def test_output_that_is_not_tensors_runs_eagerly(fake_capture, caplog):
    graphed = GraphedForward(lambda x: {"sample": x})
    with caplog.at_level(logging.WARNING, logger="diffserve.runtime.cuda_graphs"):
        out = graphed(x=torch.ones(1))
    assert out["sample"].item() == 1.0
    assert "not tensors" in caplog.text and graphed.captures == 0 and len(graphed.uncapturable) == 1


def test_errors_of_the_forward_itself_propagate(fake_capture):
    def broken(x):
        raise ValueError("pass guidance")

    graphed = GraphedForward(broken)
    for _ in range(2):  # not mistaken for a capture failure: raised every time, nothing marked
        with pytest.raises(ValueError, match="pass guidance"):
            graphed(x=torch.ones(1))
    assert not graphed.uncapturable and not graphed.graphs


# ---- cuBLAS workspaces ----------------------------------------------------------------------------------


@pytest.fixture
def blas_env(monkeypatch):
    """A process environment without any of the variables configure_blas_workspace reads or sets."""
    for name in ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE", cuda_graphs.BLAS_WORKSPACE_ENV):
        monkeypatch.setenv(name, "")  # recorded, so that teardown also undoes what the code under test sets
        monkeypatch.delenv(name)
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "1")
    return monkeypatch


def test_blas_workspace_zeroed_for_cuda_with_graphs(blas_env, caplog):
    import os

    with caplog.at_level(logging.INFO, logger="diffserve.runtime.cuda_graphs"):
        assert cuda_graphs.configure_blas_workspace("cuda:0") is True
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    assert os.environ["CUBLASLT_WORKSPACE_SIZE"] == "0"
    assert "DIFFSERVE_BLAS_WORKSPACE=default" in caplog.text  # says so, and how to turn it off


def test_blas_workspace_left_alone_under_deterministic_algorithms(blas_env):
    # torch raises at the first GEMM when deterministic algorithms are on and the workspace config is not
    # one of its deterministic ones, so a deterministic process keeps cuBLAS's setting.
    import os

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert cuda_graphs.configure_blas_workspace("cuda") is False
    finally:
        torch.use_deterministic_algorithms(previous)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "CUBLASLT_WORKSPACE_SIZE" not in os.environ


@pytest.mark.parametrize(
    "device, env",
    [
        ("cpu", {}),
        ("cuda", {"DIFFSERVE_CUDA_GRAPHS": "0"}),
        ("cuda", {"DIFFSERVE_BLAS_WORKSPACE": "default"}),
        ("cuda", {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}),
        ("cuda", {"CUBLASLT_WORKSPACE_SIZE": "1024"}),
    ],
)
def test_blas_workspace_left_alone(blas_env, device, env):
    # Off the GPU, without graphs, when switched off, or when the user chose a size: nothing changes.
    import os

    for name, value in env.items():
        blas_env.setenv(name, value)
    before = {k: os.environ.get(k) for k in ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE")}
    assert cuda_graphs.configure_blas_workspace(device) is False
    assert {k: os.environ.get(k) for k in before} == before


def test_load_runner_sets_the_workspace_before_loading(tiny_flux_dir, monkeypatch):
    from diffserve.runtime.pipelines import flux

    calls = []
    monkeypatch.setattr(cuda_graphs, "configure_blas_workspace", lambda device, eager: calls.append(device))
    load = flux.FluxPipeline.load.__func__
    monkeypatch.setattr(
        flux.FluxPipeline, "load", classmethod(lambda cls, *a: (calls.append("load"), load(cls, *a))[1])
    )
    load_runner(str(tiny_flux_dir), device="cpu")
    assert calls == ["cpu", "load"]


# ---- GPU -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_gpu(tiny_flux_dir):
    return load_runner(str(tiny_flux_dir), device="cuda", dtype="bfloat16")


@pytest.fixture(scope="module")
def wan_gpu(tiny_wan_dir):
    return load_runner(str(tiny_wan_dir), device="cuda", dtype="bfloat16")


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to("cuda", dtype)


def flux_inputs(dit, seed=0, h=8, w=8, text=16, batch=1) -> dict:
    """Keyword arguments of one FLUX DiT call at a (h, w) grid of packed tokens."""
    from diffserve.runtime.pipelines.flux import image_ids

    c, dtype, gen = dit.config, dit.dtype, torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=_randn(gen, batch, h * w, c.in_channels, dtype=dtype),
        encoder_hidden_states=_randn(gen, batch, text, c.joint_attention_dim, dtype=dtype),
        pooled_projections=_randn(gen, batch, c.pooled_projection_dim, dtype=dtype),
        timestep=torch.rand(batch, generator=gen).to("cuda", dtype),
        guidance=torch.full((batch,), 3.5, device="cuda") if c.guidance_embeds else None,
        img_ids=image_ids(h, w, "cuda", dtype),
        txt_ids=torch.zeros(text, 3, device="cuda", dtype=dtype),
        return_dict=False,
    )


@cuda
def test_graphed_flux_dit_equals_eager_and_follows_new_inputs(flux_gpu):
    dit = flux_gpu.pipeline.transformer
    graphed = GraphedForward(dit)
    with torch.inference_mode():
        a, b = flux_inputs(dit, seed=0), flux_inputs(dit, seed=1)
        out_a = graphed(**a)[0]
        assert (graphed.captures, graphed.replays, graphed.eager_calls) == (1, 1, 0)
        eager_a = dit(**a)[0]
        assert torch.equal(out_a, eager_a)  # same kernels, same numbers
        out_b = graphed(**b)[0]
        assert (graphed.captures, graphed.replays) == (1, 2)  # the same graph, replayed
        assert torch.equal(out_b, dit(**b)[0]) and not torch.equal(out_a, out_b)  # not stale
        assert torch.equal(out_a, eager_a)  # the first output was a copy: the replay did not overwrite it
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@cuda
def test_cfg_style_calls_keep_both_outputs(flux_gpu):
    """Classifier-free guidance: the same graph twice per step, then a combination of both outputs."""
    dit = flux_gpu.pipeline.transformer
    graphed = GraphedForward(dit)
    with torch.inference_mode():
        cond = flux_inputs(dit, seed=2)
        uncond = {
            **cond,
            **{k: flux_inputs(dit, seed=3)[k] for k in ("encoder_hidden_states", "pooled_projections")},
        }
        for _ in range(2):  # the first step captures, the second only replays
            out, neg = graphed(**cond)[0], graphed(**uncond)[0]
            ref_out, ref_neg = dit(**cond)[0], dit(**uncond)[0]
            assert torch.equal(out, ref_out) and torch.equal(neg, ref_neg) and not torch.equal(out, neg)
            assert torch.equal(neg + 4.0 * (out - neg), ref_neg + 4.0 * (ref_out - ref_neg))
    assert (graphed.captures, graphed.replays) == (1, 4)


@cuda
def test_one_graph_per_shape_and_lru_eviction(flux_gpu):
    dit = flux_gpu.pipeline.transformer
    graphed = GraphedForward(dit, max_graphs=2)
    with torch.inference_mode():
        sizes = [(8, 8), (8, 12), (8, 8), (8, 12)]  # alternating shapes: two graphs, both right
        inputs = {s: flux_inputs(dit, seed=s[1], h=s[0], w=s[1]) for s in set(sizes)}
        for s in sizes:
            assert torch.equal(graphed(**inputs[s])[0], dit(**inputs[s])[0])
        assert (graphed.captures, len(graphed.graphs)) == (2, 2)
        oldest = next(iter(graphed.graphs.values()))  # (8, 8): used before the last (8, 12)
        third = flux_inputs(dit, seed=4, h=4, w=8)
        assert torch.equal(graphed(**third)[0], dit(**third)[0])
        assert len(graphed.graphs) == 2 and oldest.graph is None  # evicted and released
        assert torch.equal(graphed(**inputs[(8, 8)])[0], dit(**inputs[(8, 8)])[0])  # captured again
        assert graphed.captures == 4


@cuda
@pytest.mark.parametrize("per_token", [False, True])
def test_graphed_wan_dit_equals_eager(wan_gpu, per_token):
    dit = wan_gpu.pipeline.transformer
    graphed = GraphedForward(dit)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for step in range(2):
            x = _randn(gen, 1, dit.config.in_channels, 3, 8, 8, dtype=dit.dtype)
            t = torch.tensor(900.0 - 300 * step, device="cuda")
            kwargs = dict(
                hidden_states=x,
                # Per-token timesteps (Wan2.2 TI2V) come expanded, with a zero stride, as the pipeline makes them.
                timestep=(torch.ones(3 * 4 * 4, device="cuda") * t).expand(1, -1)
                if per_token
                else t.expand(1),
                encoder_hidden_states=_randn(gen, 1, 16, dit.config.text_dim, dtype=dit.dtype),
                return_dict=False,
            )
            assert torch.equal(graphed(**kwargs)[0], dit(**kwargs)[0])
    assert (graphed.captures, graphed.replays) == (1, 2)


@cuda
def test_failed_capture_on_gpu_runs_eagerly(caplog):
    def syncing(x):
        return (x * x.sum().item(),)  # .item() cannot be captured

    graphed = GraphedForward(syncing)
    x = torch.arange(4.0, device="cuda")
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="diffserve.runtime.cuda_graphs"):
        outs = [graphed(x=x)[0] for _ in range(2)]
    assert all(torch.equal(o, x * 6) for o in outs)
    assert graphed.captures == 0 and graphed.eager_calls == 2 and len(caplog.records) == 1
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the failed capture left no trace
    assert torch.equal(torch.ones(2, device="cuda") + 1, torch.full((2,), 2.0, device="cuda"))


def _frames(result) -> np.ndarray:
    images = result.images if result.images else [f for video in result.videos for f in video]
    return np.stack([np.asarray(im) for im in images])


@cuda
@pytest.mark.parametrize("true_cfg", [False, True])
def test_flux_generation_same_pixels_with_and_without_graphs(flux_gpu, monkeypatch, true_cfg):
    dit = flux_gpu.pipeline.dit
    extra = {"true_cfg_scale": 4.0} if true_cfg else None
    req = GenerationRequest(
        "a red fox", negative_prompt="blurry", width=64, height=48, num_inference_steps=3, seed=1, extra=extra
    )
    encoders = (flux_gpu.pipeline.clip, flux_gpu.pipeline.t5)
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "0")
    before, encoded = dit.replays, [e.replays for e in encoders]
    off = _frames(flux_gpu.generate(req))
    assert dit.replays == before and [e.replays for e in encoders] == encoded
    monkeypatch.delenv(cuda_graphs.GRAPHS_ENV)
    on = _frames(flux_gpu.generate(req))
    assert dit.replays == before + 3 * (2 if true_cfg else 1)  # every forward of the loop was a replay
    # CLIP and T5 replayed too, once per prompt (the negative one with true CFG).
    prompts = 2 if true_cfg else 1
    assert [e.replays for e in encoders] == [n + prompts for n in encoded]
    assert np.array_equal(on, off) and on.std() > 1


@cuda
def test_wan_generation_same_frames_with_and_without_graphs(wan_gpu, monkeypatch):
    dit = wan_gpu.pipeline.dits[0]
    req = GenerationRequest("a red fox", width=32, height=32, num_frames=5, num_inference_steps=3, seed=1)
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "0")
    off = _frames(wan_gpu.generate(req))
    monkeypatch.delenv(cuda_graphs.GRAPHS_ENV)
    before, encoded = dit.replays, wan_gpu.pipeline.t5.replays
    on = _frames(wan_gpu.generate(req))
    assert dit.replays == before + 3 * 2  # guidance 5: two forwards per step
    assert wan_gpu.pipeline.t5.replays == encoded + 2  # UMT5 (with its mask) replayed for both prompts
    assert np.array_equal(on, off) and on.std() > 1


@cuda
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_flux_denoising_loop_never_syncs(flux_gpu, monkeypatch, graphs):
    """DIFFSERVE_CHECK_SYNC=1 runs the loop under torch.cuda.set_sync_debug_mode("error"): a generation
    completes (eagerly, and with graphs, whose capture is exempt), and a predict that syncs fails."""
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, graphs)
    monkeypatch.setenv(cuda_graphs.CHECK_SYNC_ENV, "1")
    pipeline = flux_gpu.pipeline
    steps = []
    req = GenerationRequest("a red fox", width=64, height=64, num_inference_steps=4, seed=2)
    flux_gpu.generate(req, on_step=lambda done, total: steps.append(done))
    assert steps == [1, 2, 3, 4] and torch.cuda.get_sync_debug_mode() == 0

    real = pipeline.dit

    def careless(**kwargs):
        out = real(**kwargs)
        if out[0].abs().max() > 1e6:  # bool(cuda tensor): the host waits for the GPU
            raise AssertionError("unreachable")
        return out

    monkeypatch.setattr(pipeline, "dit", careless)
    with pytest.raises(RuntimeError, match="synchroniz"):
        flux_gpu.generate(req)
    assert torch.cuda.get_sync_debug_mode() == 0  # restored after the failure


@cuda
def test_wan_two_experts_choose_without_syncing(tiny_wan22_dir, monkeypatch):
    """Wan's loop (the per-step expert, CFG, the UniPC step it ships with, through schedulers/unipc.py)
    is sync-free, and each expert replays its graph for its own steps."""
    runner = load_runner(str(tiny_wan22_dir), device="cuda", dtype="bfloat16")
    schedule = type(runner.pipeline.scheduler).from_config(runner.pipeline.scheduler.config)
    schedule.set_timesteps(4)
    high_noise = int((schedule.timesteps >= runner.pipeline.boundary).sum())  # steps of the first expert
    assert 0 < high_noise < 4
    monkeypatch.setenv(cuda_graphs.CHECK_SYNC_ENV, "1")
    runner.generate(GenerationRequest("x", width=32, height=32, num_frames=5, num_inference_steps=4, seed=0))
    first, second = runner.pipeline.dits
    assert (first.replays, second.replays) == (2 * high_noise, 2 * (4 - high_noise))  # CFG: two per step


@cuda
def test_stage_timings_tile_the_request_on_the_gpu(flux_gpu):
    """stages.Timings records CUDA events instead of waiting at every stage; settle() turns them into
    seconds on the GPU's timeline, which add up to no more than the request's wall time."""
    req = GenerationRequest("a red fox", width=64, height=64, num_inference_steps=3, seed=0)
    timings = flux_gpu.generate(req).timings
    stages_ = ("validate", "prepare_latents", "encode_text", "denoise", "decode")
    assert set(stages_) <= set(timings) and all(timings[s] >= 0 for s in stages_)
    assert timings["denoise"] > 0 and sum(timings[s] for s in stages_) <= timings["total"] * 1.05
    cpu = torch.arange(6.0).reshape(2, 3)
    on_gpu = stages.upload(cpu, "cuda")
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), cpu)


_MEMSETS_IN_A_GRAPH = """
import torch
from torch.profiler import ProfilerActivity, profile
from diffserve.runtime.cuda_graphs import configure_blas_workspace
print("configured", configure_blas_workspace("cuda"))
x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
lin = torch.nn.Linear(3072, 9216, device="cuda", dtype=torch.bfloat16)
with torch.inference_mode():
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lin(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lin(x)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    print("memsets", sum("memset" in k.lower() for k in kernels), "kernels", len(kernels))
    print("exact", torch.equal(y, lin(x)))
"""


@cuda
def test_zero_blas_workspace_leaves_no_memset_in_a_graph(tmp_path):
    # Set in a fresh process (torch reads the sizes once): a graphed GEMM of FLUX's size has no memset node.
    import os
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE")
    }
    env.pop(cuda_graphs.BLAS_WORKSPACE_ENV, None)
    env.pop(cuda_graphs.GRAPHS_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", _MEMSETS_IN_A_GRAPH], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["configured"] == "True"
    memsets, _, kernels = lines["memsets"].partition(" kernels ")
    assert int(memsets) == 0 and int(kernels) >= 1
    assert lines["exact"] == "True"
