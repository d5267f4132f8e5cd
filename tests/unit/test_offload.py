"""--offload model|layerwise (runtime/offload.py): where each weight lives between and during the stages,
that visits copy and returns, that fused views stay one buffer, that the DiT streams at most two blocks,
and that the pixels are bitwise those of the resident model (on the CPU the math is the same; only the
storage moves). The CUDA behaviour (pinned host copies, side-stream prefetch, a memory bound) is checked
by the GPU tests at the end, skipped without a GPU."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffserve.cli import main
from diffserve.runtime import offload
from diffserve.runtime.api import GenerationRequest
from diffserve.runtime.config import RuntimeConfig
from diffserve.runtime.loader import ModelLoadError
from diffserve.runtime.runner import load_runner
from diffserve.testing.tiny_models import make_tiny_model

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, streams)"
)


def _request(**kw) -> GenerationRequest:
    fields = dict(prompt="a fox", width=96, height=64, num_inference_steps=3, seed=1)
    return GenerationRequest(**{**fields, **kw})


def _pixels(runner, **kw) -> np.ndarray:
    result = runner.generate(_request(**kw))
    return np.stack([np.asarray(im) for im in (result.images or result.videos[0])])


def _runner(model_dir, mode, device="cpu", **kw):
    return load_runner(RuntimeConfig(model=str(model_dir), device=device, offload=mode, **kw))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Between visits, offloaded tensors point at NaN bytes: a weight read outside a visit changes the output
    (on the CPU the host copy would otherwise give the same numbers)."""
    monkeypatch.setattr(offload, "POISON_BETWEEN_VISITS", True)


def _on_host(module: nn.Module, group: offload.StorageGroup) -> bool:
    """Every tensor of `module` in the group points at the group's home (between visits)."""
    hosts = {home.untyped_storage().data_ptr() for home in group.homes}
    return all(t.untyped_storage().data_ptr() in hosts for t in offload._tensors(module))


_TINY: dict[str, object] = {}


def _tiny_dir(family: str, tmp_path_factory):
    if family not in _TINY:
        _TINY[family] = make_tiny_model(family, tmp_path_factory.mktemp(family) / family)
    return _TINY[family]


# ---- the storage mechanism ------------------------------------------------------------------------------


def test_storage_group_moves_shared_views_as_one_buffer_and_returns():
    fused = torch.arange(24, dtype=torch.float32)
    a = nn.Parameter(fused[:12].view(3, 4), requires_grad=False)  # two views of one fused buffer,
    b = nn.Parameter(fused[12:].view(3, 4), requires_grad=False)  # as models.base.fuse_linears makes them
    before = (a.clone(), b.clone())
    group = offload.StorageGroup([a, b], torch.device("cpu"))
    assert len(group.storages) == 1 and group.nbytes == 24 * 4  # one storage, not one per view
    host = group.homes[0].untyped_storage().data_ptr()
    assert a.untyped_storage().data_ptr() == host
    assert a.isnan().all()  # poisoned between visits (the fixture)

    group.load()
    visiting = a.untyped_storage().data_ptr()
    assert visiting != host  # a separate copy (on the CPU the visit clones)
    assert b.untyped_storage().data_ptr() == visiting  # still views of one buffer
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    group.release()
    assert a.untyped_storage().data_ptr() == host and group.on_device is None
    assert a.isnan().all() and b.isnan().all()  # home again (poisoned); the host copy is intact:
    group.load()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_config_and_cli_reject_bad_combinations(tiny_flux_dir, capsys):
    with pytest.raises(ValueError, match="--offload must be one of model, layerwise"):
        RuntimeConfig(offload="disk")
    with pytest.raises(ValueError, match="--offload layerwise cannot run with --compile"):
        RuntimeConfig(offload="layerwise", compile=True)
    with pytest.raises(ValueError, match="--offload layerwise cannot run with --lora"):
        RuntimeConfig(offload="layerwise", loras=("a=/x.safetensors",))
    RuntimeConfig(offload="model", compile=True)  # the DiT is resident in model mode: compile is fine
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_flux_dir), "--prompt", "x", "--offload", "disk"])
    assert e.value.code == 2
    assert "--offload" in capsys.readouterr().err


def test_generic_pipelines_refuse_offload(tiny_generic_dir):
    with pytest.raises(ModelLoadError, match="--offload needs a native"):
        _runner(tiny_generic_dir, "model")


# ---- model mode -----------------------------------------------------------------------------------------


def test_model_mode_components_visit_for_their_stage_only(tiny_flux_dir):
    runner = _runner(tiny_flux_dir, "model")
    pipe = runner.pipeline
    (manager,) = pipe.offload
    assert sorted(manager.groups) == ["text_encoder", "text_encoder_2", "vae"]
    assert manager.resident() == []  # between requests: all on the host
    for name, group in manager.groups.items():
        assert _on_host(pipe.components[name], group), name
    # The text encoders' CUDA graphs are off (their weights move); the DiT's stay available.
    assert pipe.clip.disabled and pipe.t5.disabled and pipe.dit.disabled is None

    seen = {}

    def at_dit(*_):  # (a pre-hook that returns something replaces the inputs)
        seen.setdefault("at_dit", manager.resident())

    pipe.transformer.register_forward_pre_hook(at_dit)
    _pixels(runner)
    assert seen["at_dit"] == []  # the text encoders went home before the denoising loop
    assert manager.visits == {"text_encoder": 1, "text_encoder_2": 1, "vae": 1}
    assert manager.resident() == []  # the VAE went home when the generation ended


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "family,kw",
    [
        ("flux", {}),
        ("flux", {"image": "png", "strength": 0.6}),  # image-to-image: the VAE encodes too
        ("wan", {"num_frames": 5, "width": 64}),
        ("wan2.2", {"num_frames": 5, "width": 64}),  # two DiTs (high- and low-noise steps): both streamed
        ("flux-kontext", {"image": "png", "width": 64}),
        ("qwen-image", {"width": 64}),
        ("qwen-image-edit", {"image": "png", "width": 64}),
    ],
)
def test_offload_pixels_are_bitwise_the_resident_ones(family, kw, tmp_path_factory):
    # With the poison fixture: every weight the offloaded stages read was read during a visit.
    model_dir = _tiny_dir(family, tmp_path_factory)
    kw = {**kw, "image": _png()} if "image" in kw else kw
    reference = _pixels(_runner(model_dir, None), **kw)
    for mode in ("model", "layerwise"):
        got = _pixels(_runner(model_dir, mode), **kw)
        assert np.array_equal(got, reference), (family, mode)


# ---- layerwise ------------------------------------------------------------------------------------------


def test_layerwise_streams_at_most_two_blocks_and_keeps_fused_adaln_resident(tiny_flux_dir):
    runner = _runner(tiny_flux_dir, "layerwise")
    pipe = runner.pipeline
    streamer = pipe.offload[-1]
    assert isinstance(streamer, offload.BlockStreamer)
    dit = pipe.transformer
    n = len(dit.transformer_blocks) + len(dit.single_transformer_blocks)
    assert len(streamer.blocks) == n and streamer.resident() == []
    # The text encoders and VAE visit whole; the DiT is the streamer's alone (never copied over whole).
    assert sorted(pipe.offload[0].groups) == ["text_encoder", "text_encoder_2", "vae"]
    assert pipe.dit.disabled  # the DiT's CUDA graphs are off: the blocks' addresses change every step
    # FLUX's fused adaLN buffer (every block's projections are views into it) is read up front at every
    # request, so it stays resident rather than streamed with any block.
    adaln = dit.adaln_weight.untyped_storage().data_ptr()
    assert all(adaln not in {h.untyped_storage().data_ptr() for h, _ in g.storages} for g in streamer.groups)

    most = []
    for i, block in enumerate(streamer.blocks):  # registered after the streamer's: it has run by then
        block.register_forward_pre_hook(
            lambda _m, _a, i=i: most.append(
                (i, streamer.resident(), streamer.groups[i].on_device is not None)
            )
        )
    _pixels(runner)  # 3 steps
    assert len(most) == 3 * n
    assert all(len(res) <= 2 and loaded for _, res, loaded in most)  # two block buffers, the running one in
    assert streamer.loads == 3 * n + 1  # each block once a step, plus the first block prefetched for a 4th
    assert streamer.resident() == []  # home after the request


def test_layerwise_with_the_step_cache(tiny_flux_dir):
    # The cache runs the head blocks alone on reused steps, breaking the streaming order: the leftover
    # prefetched block goes home and the head's blocks are fetched in turn, the output unchanged.
    kw = dict(num_inference_steps=10, extra={"step_cache_threshold": 1.0})
    reference = _runner(tiny_flux_dir, None, step_cache="first-block").generate(_request(**kw))
    runner = _runner(tiny_flux_dir, "layerwise", step_cache="first-block")
    got = runner.generate(_request(**kw))
    assert got.dit_forwards == reference.dit_forwards and got.dit_forwards["cached"] > 0
    assert np.array_equal(np.asarray(got.images[0]), np.asarray(reference.images[0]))
    assert runner.pipeline.offload[-1].resident() == []


def test_offload_with_fp8(tiny_flux_dir):
    # Under layerwise the DiT is quantised on the host before its blocks are pinned: the same FP8 weights.
    reference = _pixels(_runner(tiny_flux_dir, None, quantization="fp8"))
    for mode in ("model", "layerwise"):
        assert np.array_equal(_pixels(_runner(tiny_flux_dir, mode, quantization="fp8")), reference), mode


def test_model_mode_with_lora(tiny_flux_dir, tmp_path):
    # The DiT stays resident in model mode, so LoRA adapters work as without offload.
    from diffserve.testing.tiny_loras import make_tiny_lora

    make_tiny_lora(tiny_flux_dir, tmp_path / "style.safetensors", seed=1)
    loras = (f"style={tmp_path / 'style.safetensors'}",)
    kw = dict(extra={"lora": {"style": 0.7}})
    reference = _pixels(_runner(tiny_flux_dir, None, loras=loras), **kw)
    assert not np.array_equal(reference, _pixels(_runner(tiny_flux_dir, None)))  # the adapter shows
    assert np.array_equal(_pixels(_runner(tiny_flux_dir, "model", loras=loras), **kw), reference)


def test_cli_generate_offload_same_file(tiny_flux_dir, tmp_path):
    def run(*extra):
        out = tmp_path / f"out{'-'.join(extra)}.png"
        args = ["generate", "--model", str(tiny_flux_dir), "--prompt", "a fox", "--size", "96x64"]
        assert main([*args, "--steps", "3", "--seed", "1", "--device", "cpu", "-o", str(out), *extra]) == 0
        return np.asarray(Image.open(out))

    reference = run()
    assert np.array_equal(run("--offload", "model"), reference)
    assert np.array_equal(run("--offload", "layerwise"), reference)


# ---- CUDA -------------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_model_mode_pins_host_copies_and_matches(tiny_flux_dir):
    reference = _pixels(_runner(tiny_flux_dir, None, device="cuda", dtype="fp32"))
    runner = _runner(tiny_flux_dir, "model", device="cuda", dtype="fp32")
    (manager,) = runner.pipeline.offload
    for name, group in manager.groups.items():
        assert all(host.is_pinned() for host, _ in group.storages), name
        assert next(runner.pipeline.components[name].parameters()).device.type == "cpu"
    assert next(runner.pipeline.transformer.parameters()).device.type == "cuda"
    # Same kernels on the same weights; only the text encoders' graphs are off, which replay the same ops
    # (a capture may pick another cuBLASLt algorithm: allow the last bit of an 8-bit pixel).
    assert np.abs(_pixels(runner).astype(int) - reference.astype(int)).max() <= 1
    assert manager.resident() == []


@needs_cuda
def test_cuda_layerwise_prefetches_on_a_side_stream_and_bounds_memory(tiny_flux_dir):
    reference = _pixels(_runner(tiny_flux_dir, None, device="cuda", dtype="fp32"))
    runner = _runner(tiny_flux_dir, "layerwise", device="cuda", dtype="fp32")
    streamer = runner.pipeline.offload[-1]
    assert streamer.stream is not None
    assert all(host.is_pinned() for g in streamer.groups for host, _ in g.storages)
    got = _pixels(runner)
    # The DiT runs eagerly here and in CUDA graphs in the reference: the same kernels, but allow the last
    # bit of an 8-bit pixel for a different GEMM algorithm choice inside a capture.
    assert np.abs(got.astype(int) - reference.astype(int)).max() <= 1
    assert streamer.resident() == []


def test_bench_offload_tiny(tmp_path):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    spec = importlib.util.spec_from_file_location("bench_offload", benchmarks / "bench_offload.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "results.jsonl"
    argv = [
        "--tiny",
        "--configs",
        "none",
        "layerwise@24",
        "model+fp8",
        "--runs",
        "1",
        "--results",
        str(results),
    ]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["diffserve-none", "diffserve-layerwise@24", "diffserve-model+fp8"]
    assert all(r["benchmark"] == "offload_flux_64_2steps_tiny_cpu" and len(r["runs_s"]) == 1 for r in rows)
    assert rows[0]["slowdown"] == 1.0 and all(r["slowdown"] > 0 for r in rows)
    with pytest.raises(ValueError, match="MODE"):
        bench.parse_config("disk@24")

    # --serve: the same configuration through a live server whose worker loads with capped_runner
    results.unlink()
    argv = ["--tiny", "--serve", "--configs", "layerwise@24", "--runs", "1", "--results", str(results)]
    assert bench.main(argv) == 0
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["benchmark"] == "offload_flux_64_2steps_http_tiny_cpu" and row["via"] == "http"
    assert row["impl"] == "diffserve-layerwise@24" and len(row["runs_s"]) == 1


class _Stack(nn.Module):
    """A DiT-shaped stand-in: a resident embedder, then `blocks` of 16 MB each (fp32 2048x2048)."""

    def __init__(self, n: int = 8, width: int = 2048):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_block_streamer_bounds_device_memory_and_matches(device):
    resident = _Stack().to(device)
    x = torch.randn(4, 64, device=device)
    with torch.inference_mode():
        reference = resident(x)
    streamed = _Stack()  # on the host, as the loader leaves a DiT for layerwise
    streamer = offload.BlockStreamer(streamed, device)
    assert streamed.embed.weight.device.type == torch.device(device).type  # the rest of it: resident
    block_bytes = streamer.groups[0].nbytes
    assert block_bytes == (2048 * 2048 + 2048) * 4
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        for _ in range(3):  # several steps: the prefetch wraps around to the first block
            out = streamed(x)
    assert torch.equal(out, reference)  # the same weights and kernels, only copied
    del out
    streamer.release()
    if device == "cuda":
        torch.cuda.synchronize()
        # The brake: at most three block copies at once (one finishing, one running, one prefetched), plus
        # the activations (4 x 2048 floats, a few per block) and the allocator's rounding: one block of slack.
        assert torch.cuda.max_memory_allocated() - before <= 4 * block_bytes
        assert streamer.stream is not None and torch.cuda.memory_allocated() == before
