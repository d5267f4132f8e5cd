"""Ulysses and CFG parallelism on the CPU: 2 and 4 gloo ranks give what 1 rank gives.

Each world is spawned once (torch.multiprocessing, a free port on 127.0.0.1) and runs every layout of its
size in turn: 2 ranks -> ulysses 2, cfg 2; 4 ranks -> ulysses 4, ulysses 2 x cfg 2. Under each, rank 0
compares against its own unsharded run of the same code: FLUX and Wan DiT forwards (token counts the
degree does not divide, so the padding path runs; Wan with per-token timesteps too) and whole 2-step
generations (FLUX with true CFG and a negative prompt, Wan with CFG), through load_runner on tiny models
widened to 4 heads so that Ulysses 4 has a head per rank.

Tolerance: fp32, relative 2e-5 (norm of the difference over the norm of the reference). Sharding changes
how many rows each matmul sees and how many heads each attention call gets, so the CPU kernels block and
vectorise the sums differently: the results differ by rounding (about 1e-7 per operation), not exactly.
A real mistake (a token or head out of place, RoPE on the wrong rows, padding attended to) gives O(1).
Measured max 1.29e-6 over the forwards and generations (threads 1/2, ATEN_CPU_CAPABILITY avx512/avx2/default,
MKL_CBWR=COMPATIBLE with oneDNN AVX2/SSE4.1); 2e-5 is 15x that (1e-5 was 7.7x).

Also here: the sharded forward compiled block by block (torch.compile, fullgraph) under ulysses 2; the
launcher (load_parallel_runner: this process as rank 0 and a spawned follower); `diffserve generate` with
--ulysses-degree (spawned) and --cfg-parallel (under torchrun).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from diffserve.runtime.api import GenerationCancelled, GenerationRequest
from diffserve.runtime.config import RuntimeConfig
from diffserve.runtime.distributed import group as pg
from diffserve.runtime.distributed.config import ParallelConfig, ParallelConfigError
from diffserve.runtime.models.flux import FluxTransformer
from diffserve.runtime.models.wan import WanTransformer

TOL = 2e-5  # see the module docstring: measured max 1.29e-6
HEADS = 4
# Token counts: FLUX 5x3 = 15 image tokens, Wan 3x3x5 = 45 video tokens (neither divisible by 2 or 4).
FLUX_REQ = dict(
    width=80,
    height=48,
    num_inference_steps=2,
    seed=3,
    negative_prompt="blurry",
    extra={"true_cfg_scale": 4.0},
)
WAN_REQ = dict(width=80, height=48, num_frames=9, num_inference_steps=2, guidance_scale=5.0, seed=4,
               negative_prompt="static")  # fmt: skip
LAYOUTS = {2: [ParallelConfig(2), ParallelConfig(1, True)], 4: [ParallelConfig(4), ParallelConfig(2, True)]}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.15 if p.ndim > 1 else 0.5))
    return model.eval()


def _widen(src, dst, cls, changes: dict, seed: int):
    """A copy of the tiny model whose DiT has HEADS heads (same width), random weights."""
    shutil.copytree(src, dst)
    cfg_path = dst / "transformer" / "config.json"
    config = {**json.loads(cfg_path.read_text()), **changes}
    cfg_path.write_text(json.dumps(config))
    for f in (dst / "transformer").glob("*.safetensors*"):
        f.unlink()
    model = _randomise(cls.from_config(config), seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              dst / "transformer" / "diffusion_pytorch_model.safetensors")  # fmt: skip
    return dst


@pytest.fixture(scope="module")
def wide_models(tiny_flux_dir, tiny_wan_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    flux = _widen(tiny_flux_dir, root / "flux", FluxTransformer,
                  dict(num_attention_heads=HEADS, attention_head_dim=8, axes_dims_rope=[2, 2, 4]), 1)  # fmt: skip
    wan = _widen(
        tiny_wan_dir, root / "wan", WanTransformer, dict(num_attention_heads=HEADS, attention_head_dim=6), 2
    )
    return str(flux), str(wan)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- what every rank runs -----------------------------------------------------------------------------


def _dit_inputs(runner, family: str, per_token: bool = False) -> dict:
    g = torch.Generator().manual_seed(7)
    c = runner.pipeline.transformer.config
    if family == "flux":
        h, w, txt = 3, 5, 6
        return dict(
            hidden_states=torch.randn(2, h * w, c.in_channels, generator=g),
            encoder_hidden_states=torch.randn(2, txt, c.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g),
            timestep=torch.rand(2, generator=g),
            img_ids=torch.randint(0, 8, (h * w, 3), generator=g).float(),
            txt_ids=torch.zeros(txt, 3),
            guidance=torch.full((2,), 3.5),
            return_dict=False,
        )
    frames, h, w = 3, 6, 10  # 3 x 3 x 5 = 45 tokens after the 1x2x2 patches
    tokens = frames * (h // 2) * (w // 2)
    timestep = torch.rand(2, tokens, generator=g) * 1000 if per_token else torch.rand(2, generator=g) * 1000
    return dict(
        hidden_states=torch.randn(2, c.in_channels, frames, h, w, generator=g),
        timestep=timestep,
        encoder_hidden_states=torch.randn(2, 7, c.text_dim, generator=g),
        return_dict=False,
    )


def _generate(runner, family: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(final latents, pixels, DiT forward calls) of one 2-step generation."""
    from diffserve.runtime.pipelines import stages

    latents, calls, dit = [], [0], runner.pipeline.transformer
    name = "decode_images" if family == "flux" else "decode_videos"
    decode = getattr(stages, name)  # the final latents, as the VAE stage receives them
    setattr(stages, name, lambda vae, z: latents.append(z.clone()) or decode(vae, z))
    hook = dit.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        req = GenerationRequest(prompt=f"a tiny {family}", **(FLUX_REQ if family == "flux" else WAN_REQ))
        result = runner.generate(req)
    finally:
        hook.remove()
        setattr(stages, name, decode)
    frames = result.images if family == "flux" else result.videos[0]
    pixels = torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in frames]).int()
    return latents[0], pixels, calls[0]


def _note(seen: dict, key: str, value) -> None:  # a forward pre-hook must return None
    seen[key] = value


def _run_all(flux, wan) -> dict:
    """Every output compared, under whatever parallel state is active."""
    out, calls, tokens = {}, {}, {}
    for family, runner in (("flux", flux), ("wan", wan)):
        dit = runner.pipeline.transformer
        first = (dit.transformer_blocks if family == "flux" else dit.blocks)[0]
        hook = first.register_forward_pre_hook(lambda _, args, f=family: _note(tokens, f, args[0].shape[1]))
        out[f"{family}_dit"] = dit(**_dit_inputs(runner, family))[0]
        hook.remove()
        if family == "wan":
            out["wan_dit_per_token"] = dit(**_dit_inputs(runner, family, per_token=True))[0]
        out[f"{family}_latents"], out[f"{family}_pixels"], calls[family] = _generate(runner, family)
    return {"out": out, "dit_calls": calls, "tokens": tokens}


def _compiled_dits(flux, wan) -> dict:
    """DiT forwards with every block compiled as the runtime's regional compilation does, fullgraph=True so
    that a graph break fails; the "eager" backend checks the tracing without a C++ toolchain."""
    out = {}
    for family, runner in (("flux", flux), ("wan", wan)):
        dit = runner.pipeline.transformer
        blocks = [*dit.transformer_blocks, *dit.single_transformer_blocks] if family == "flux" else dit.blocks
        for block in blocks:
            block.forward = torch.compile(block.forward, backend="eager", fullgraph=True)
        try:
            out[f"{family}_dit"] = dit(**_dit_inputs(runner, family))[0]
        finally:
            for block in blocks:
                del block.forward
    return out


def _fp8_attention_dits(rank: int, states, flux, wan) -> dict:
    """The DiT forwards with FP8 attention (`--quantization fp8-attention`'s switch; the CPU's emulation): alone
    on rank 0, then under each layout. Ulysses gives each rank whole heads over the whole sequence, so the
    per-(batch, head) scales are those of one rank."""
    from diffserve.runtime.layers.attention import use_fp8_attention

    for runner in (flux, wan):
        use_fp8_attention(runner.pipeline.transformer)

    def dits():
        return {f: r.pipeline.transformer(**_dit_inputs(r, f))[0] for f, r in (("flux", flux), ("wan", wan))}

    return run_each(rank, states, dits)


def run_each(rank: int, states, run) -> dict:
    """{"reference": run() alone (rank 0 only), layout.describe(): run() under each of `states`}."""
    report = {}
    if rank == 0:
        pg.activate(None)
        report["reference"] = run()
    for state in states:
        pg.activate(state)
        report[state.config.describe()] = run()
    return report


def run_layouts(rank: int, world: int, port: int, layouts, run) -> tuple[dict, list]:
    """One rank of a spawned gloo world: joins it with the first layout, builds the others, and returns
    ({"reference": run() alone (rank 0 only), layout.describe(): run() under that layout}, the states)."""
    first, *others = layouts
    states = [
        pg.init_distributed(first, "cpu", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    ]
    states += [pg.build_state(config, "cpu") for config in others]
    return run_each(rank, states, run), states


def _rank_main(rank: int, world: int, port: int, models: tuple[str, str], results: str) -> None:
    from diffserve.runtime.runner import load_runner

    torch.set_num_threads(1)
    flux, wan = (load_runner(m, device="cpu") for m in models)
    with torch.inference_mode():
        report, states = run_layouts(rank, world, port, LAYOUTS[world], lambda: _run_all(flux, wan))
        # Cancellation decided on rank 0 stops every rank at the same step (synced over the control group).
        from diffserve.runtime.distributed.launch import synced_cancel

        checks = []
        cancel = synced_cancel(states[-1], lambda: len(checks) >= 2 if rank == 0 else True)
        try:
            wan.generate(
                GenerationRequest(prompt="x", **WAN_REQ), should_cancel=lambda: checks.append(1) or cancel()
            )
            report["cancelled_after_checks"] = None
        except GenerationCancelled:
            report["cancelled_after_checks"] = len(checks)
        if world == 2:  # the sharded forward traces whole under torch.compile (blocks compiled, no break)
            pg.activate(states[0])
            report["compiled"] = _compiled_dits(flux, wan)
            report["fp8_attention"] = _fp8_attention_dits(rank, states, flux, wan)
    torch.save(report, f"{results}/rank{rank}.pt")  # files: tensors in a queue would outlive their sender
    pg.shutdown_distributed()


def _spawn_world(world: int, models, results) -> dict[int, dict]:
    port = _free_port()
    mp.start_processes(
        _rank_main, args=(world, port, models, str(results)), nprocs=world, start_method="spawn"
    )
    return {rank: torch.load(results / f"rank{rank}.pt") for rank in range(world)}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_matches_reference(got: dict, ref: dict, rank0: dict, where) -> None:
    """A parallel run's outputs against the one-rank reference: pixels within one uint8 level (rounding
    may land on the other side of .5), tensors within TOL; and bit for bit rank 0's (every rank steps its
    scheduler identically)."""
    for key, value in ref.items():
        if key.endswith("pixels"):
            assert (got[key] - value).abs().max() <= 1, (*where, key)
        else:
            assert _rel_err(got[key], value) < TOL, (*where, key)
        assert torch.equal(got[key], rank0[key]), (*where, key)


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layouts_match_one_rank(world, wide_models, tmp_path):
    reports = _spawn_world(world, wide_models, tmp_path)
    ref = reports[0]["reference"]
    for config in LAYOUTS[world]:
        name = config.describe()
        for rank in range(world):
            got = reports[rank][name]
            assert_matches_reference(got["out"], ref["out"], reports[0][name]["out"], (name, rank))
            # The work really was split: with CFG parallelism each rank runs one DiT forward per step
            # instead of two (2 steps; FLUX: 2 forwards per step only with true CFG).
            # ... and each rank's blocks saw its share of the tokens: ceil(15 / P) image, ceil(45 / P) video.
            share = -(-15 // config.ulysses_degree), -(-45 // config.ulysses_degree)
            assert tuple(got["tokens"].values()) == share, (name, rank, got["tokens"])
            per_step = 1 if config.cfg_parallel else 2
            assert got["dit_calls"] == {"flux": 2 * per_step, "wan": 2 * per_step}, (
                name,
                rank,
                got["dit_calls"],
            )
    assert {reports[r]["cancelled_after_checks"] for r in range(world)} == {2}
    if world == 2:
        for key, value in reports[0]["compiled"].items():
            assert _rel_err(value, ref["out"][key]) < TOL, ("compiled", key)
        # FP8 attention under each layout: the one-rank FP8 output, up to the e4m3 roundings that the GEMMs'
        # float32 differences (TOL) can flip: one flip moves an element by <= 2^-4 of itself, and few flip
        fp8_ref = reports[0]["fp8_attention"]["reference"]
        assert _rel_err(fp8_ref["wan"], ref["out"]["wan_dit"]) > TOL  # FP8 really ran
        for config in LAYOUTS[world]:
            for rank in range(world):
                for family, value in reports[rank]["fp8_attention"][config.describe()].items():
                    assert _rel_err(value, fp8_ref[family]) < 1e-3, (config.describe(), rank, family)


# ---- configuration ------------------------------------------------------------------------------------


def test_parallel_config_validation():
    assert ParallelConfig(3, True).world_size == 6 and ParallelConfig().world_size == 1
    with pytest.raises(ParallelConfigError, match="at least 1"):
        ParallelConfig(0)
    with pytest.raises(ParallelConfigError, match="12 attention heads.*1, 2, 3, 4, 6, 12"):
        ParallelConfig(8).check_model("wan", 12, "Wan2.1-1.3B")
    ParallelConfig(4, True).check_model("flux", 24)
    with pytest.raises(ParallelConfigError, match="FLUX and Wan"):
        ParallelConfig(2).check_model("generic", 8, "sd3")
    with pytest.raises(ParallelConfigError, match="needs exactly 4 processes.*has 2"):
        ParallelConfig(2, True).check_world_size(2)
    with pytest.raises(ParallelConfigError, match="needs 4 cuda devices"):
        ParallelConfig(4).check_devices("cuda", 2)
    assert pg.backend_for(torch.device("cpu")) == "gloo" and pg.backend_for(torch.device("cuda", 1)) == "nccl"
    assert not dist.is_initialized() and pg.current() is None


# ---- the launcher: this process is rank 0, a spawned follower is rank 1 -------------------------------


def test_parallel_runner_follows_rank_zero(wide_models):
    from diffserve.runtime.distributed.launch import ParallelRunner, load_parallel_runner
    from diffserve.runtime.runner import load_runner

    threads, wan = torch.get_num_threads(), wide_models[1]
    with torch.inference_mode():
        ref_latents, ref_pixels, _ = _generate(load_runner(wan, device="cpu"), "wan")
    runner = load_parallel_runner(wan, device="cpu", ulysses_degree=2)
    try:
        assert isinstance(runner, ParallelRunner) and pg.current().config == ParallelConfig(2)
        # The Runner surface the CLI and the server read passes through.
        assert (runner.family, runner.task, runner.pipeline.rules.frame_step) == ("wan", "video", 4)
        latents, pixels, calls = _generate(runner, "wan")
        assert _rel_err(latents, ref_latents) < TOL and (pixels - ref_pixels).abs().max() <= 1
        assert calls == 4  # ulysses only: both CFG branches here, each sharded over the two ranks
        with pytest.raises(GenerationCancelled):  # rank 0's cancel stops the follower at the same step
            runner.generate(GenerationRequest(prompt="x", **WAN_REQ), should_cancel=lambda: True)
        # Still in step: an unseeded request (rank 0 picks the seed for all) and a warmup both complete.
        req = GenerationRequest(prompt="y", width=32, height=32, num_frames=5, num_inference_steps=1)
        assert runner.generate(req).seed is not None
        runner.warmup([(32, 32)], max_batch=2)  # batch shapes 1 and 2 on both ranks, still in step
        assert runner.generate(req).seed is not None
    finally:
        runner.close()
        torch.set_num_threads(threads)
    assert [p.exitcode for p in runner._followers] == [0]
    assert not dist.is_initialized() and pg.current() is None


def test_launcher_refuses_bad_layouts_before_starting(tiny_flux_dir):
    from diffserve.runtime.distributed.launch import load_parallel_runner
    from diffserve.runtime.loader import ModelLoadError
    from diffserve.runtime.runner import Runner

    # load_runner's contract: what the user can fix is a ModelLoadError with a one-line message.
    with pytest.raises(ModelLoadError, match="2 attention heads.*use one of 1, 2"):
        load_parallel_runner(str(tiny_flux_dir), device="cpu", ulysses_degree=4)
    with pytest.raises(ModelLoadError, match="at least 1"):
        load_parallel_runner(str(tiny_flux_dir), device="cpu", ulysses_degree=0)
    assert not dist.is_initialized()
    # A world of one is plain load_runner.
    assert type(load_parallel_runner(str(tiny_flux_dir), device="cpu")) is Runner


# ---- `diffserve generate --ulysses-degree/--cfg-parallel`: spawned, and under torchrun -----------------


def _cli(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={torchrun}"] if torchrun else []
    cmd = [sys.executable, *launcher, "-m", "diffserve", "generate", "--device", "cpu", "-q", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def test_generate_cli_spreads_over_ranks(wide_models, tmp_path):
    from PIL import Image

    from diffserve.runtime.runner import load_runner

    flux, wan = wide_models
    common = ["--prompt", "a tiny flux", "--size", "80x48", "--steps", "2", "--seed", "3"]
    done = _cli("--model", flux, *common, "--ulysses-degree", "2", "-o", str(tmp_path / "u2.png"))
    assert done.returncode == 0, done.stderr
    req = GenerationRequest("a tiny flux", width=80, height=48, num_inference_steps=2, seed=3)
    ref = np.asarray(load_runner(flux, device="cpu").generate(req).images[0], dtype=np.int16)
    assert np.abs(np.asarray(Image.open(tmp_path / "u2.png"), dtype=np.int16) - ref).max() <= 1
    # The flags reach the layout check: 4 heads do not split 3 ways.
    bad = _cli("--model", flux, *common, "--ulysses-degree", "3", "-o", str(tmp_path / "u3.png"))
    assert bad.returncode == 2 and "4 attention heads" in bad.stderr and "1, 2, 4" in bad.stderr
    # Under torchrun every rank runs the command; rank 0 alone writes the video, the other follows it.
    video = [
        "--prompt",
        "waves",
        "--negative-prompt",
        "still",
        "--size",
        "32x32",
        "--frames",
        "5",
        "--steps",
        "2",
    ]
    run = _cli("--model", wan, *video, "--cfg-parallel", "-o", str(tmp_path / "cfg.mp4"), torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and (tmp_path / "cfg.mp4").stat().st_size > 0


def test_ranks_keep_cublas_workspace(monkeypatch):
    # Ranks run eagerly (no CUDA graphs with several ranks): the runner's "no cuBLAS workspace" setting,
    # which pays off only in graphs, is left off in them.
    import os

    from diffserve.runtime import cuda_graphs, runner
    from diffserve.runtime.distributed import launch

    for name in ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE", cuda_graphs.BLAS_WORKSPACE_ENV):
        monkeypatch.setenv(name, "")  # recorded, so that teardown also undoes what the code under test sets
        monkeypatch.delenv(name)

    class Loaded(Exception):  # raised right after load_runner has set cuBLAS up (by the dtype parse)
        pass

    def stop_after_blas(dtype, device):
        raise Loaded

    monkeypatch.setattr(runner, "inspect_model", lambda model: object())
    monkeypatch.setattr(runner, "check_device", lambda device: device)
    monkeypatch.setattr(runner, "parse_dtype", stop_after_blas)
    monkeypatch.setattr(cuda_graphs, "graphs_enabled", lambda: True)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    with pytest.raises(Loaded):
        launch._load(RuntimeConfig("m", ulysses_degree=2), "cuda:1", 2)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "CUBLASLT_WORKSPACE_SIZE" not in os.environ
    with pytest.raises(Loaded):  # the same load as one process (graphs on): no workspace
        runner.load_runner(RuntimeConfig("m", device="cuda:1"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
