"""The sync-free UniPC (diffserve/runtime/schedulers/unipc.py) against diffusers' UniPCMultistepScheduler.

On the CPU: both step through whole schedules with the same random model outputs; solver orders 1 and 2 give
bit-identical samples (the coefficients are the same float32 numbers, the tensor ops the same in the same
order), order 3 agrees to ~1.6e-7 relative (measured max 1.6e-7; bound 1e-6): its two history terms are
summed by us as two multiply-adds, by diffusers through einsum, which rounds differently. Configurations
outside the supported set come back as the diffusers object. Wan generations use it.
On a CUDA GPU: our step loop runs under torch.cuda.set_sync_debug_mode("error") while diffusers' step
trips it, and tiny Wan2.1 / Wan2.2 generations complete with DIFFSERVE_CHECK_SYNC=1.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from diffserve.runtime import cuda_graphs
from diffserve.runtime.api import GenerationRequest
from diffserve.runtime.pipelines import wan as wan_module
from diffserve.runtime.runner import load_runner
from diffserve.runtime.schedulers import HostUniPC, sync_free_scheduler

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ORDER3_BOUND = 1e-6  # relative to the sample's largest magnitude; see the module docstring
# diffusers on a GPU computes its coefficients there (log, expm1 and solve round differently from the CPU's)
# and divides by a device scalar where we multiply by the reciprocal: a few float32 ulps over 10 steps.
GPU_BOUND = 1e-5
WAN21 = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)  # + diffusers' defaults


def _pair(steps: int, device=None, begin: int = 0, **config):
    """Two identical diffusers schedulers, set up as the Wan pipeline does; the second one made sync-free."""
    config = {**WAN21, **config}
    ref, other = UniPCMultistepScheduler(**config), UniPCMultistepScheduler(**config)
    for s in (ref, other):
        s.set_timesteps(steps, device=device)
        s.set_begin_index(begin)
    return ref, sync_free_scheduler(other)


def _run_both(ref, ours, begin=0, shape=(1, 4, 3, 4, 6), output_dtype=torch.float32, device="cpu", seed=0):
    """Steps both over the schedule with the same model outputs; yields (ours, diffusers) after each step."""
    gen = torch.Generator(device).manual_seed(seed)
    x = y = torch.randn(shape, generator=gen, device=device)
    for t in ref.timesteps[begin:]:
        out = torch.randn(shape, generator=gen, device=device).to(output_dtype)
        x = ref.step(out, t, x, return_dict=False)[0]
        y = ours.step(out, t, y, return_dict=False)[0]
        yield y, x


@pytest.mark.parametrize("shift", [3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_matches_diffusers_over_whole_schedules(shift, steps, solver_type, order):
    # bh1 ending at sigma 0 is NaN in diffusers itself (see the fallback test): bh1 runs to sigma_min here.
    final = "zero" if solver_type == "bh2" else "sigma_min"
    ref, ours = _pair(
        steps, flow_shift=shift, solver_type=solver_type, solver_order=order, final_sigmas_type=final
    )
    assert isinstance(ours, HostUniPC)
    n = 0
    for y, x in _run_both(ref, ours):
        assert y.dtype == x.dtype == torch.float32 and torch.isfinite(y).all()
        if order < 3:
            assert torch.equal(y, x), f"step {n}: max |diff| {(y - x).abs().max():.3g}"
        else:
            rel = ((y - x).abs().max() / x.abs().max()).item()
            assert rel <= ORDER3_BOUND, f"step {n}: relative difference {rel:.3g}"
        n += 1
    assert n == steps and ours.step_index == steps


@pytest.mark.parametrize(
    "config",
    [
        dict(disable_corrector=[0, 3]),  # no corrector after those steps
        dict(use_karras_sigmas=True),  # another sigma schedule: taken as set_timesteps made it
        dict(flow_shift=5.0, solver_order=3, final_sigmas_type="sigma_min", disable_corrector=[2]),
        dict(solver_order=1, lower_order_final=False),
    ],
)
def test_matches_diffusers_with_other_options(config):
    ref, ours = _pair(8, **config)
    assert isinstance(ours, HostUniPC)
    results = list(_run_both(ref, ours))
    assert len(results) == 8
    for y, x in results:
        assert ((y - x).abs().max() / x.abs().max()).item() <= ORDER3_BOUND
        assert torch.equal(y, x) or ref.config.solver_order == 3


def test_corrector_matters_so_disabling_it_is_really_followed():
    """Guards the comparison above: with and without disable_corrector the samples do differ."""
    a = [y for y, _ in _run_both(*_pair(6))]
    b = [y for y, _ in _run_both(*_pair(6, disable_corrector=[1]))]
    assert torch.equal(a[1], b[1]) and not torch.equal(a[2], b[2])  # the step after 1 is no longer corrected


def test_bfloat16_model_outputs_and_a_later_start():
    """Wan's DiT answers in bfloat16 while the latents are float32; img2img-style starts skip early steps."""
    ref, ours = _pair(10, begin=3)
    results = list(_run_both(ref, ours, begin=3, output_dtype=torch.bfloat16))
    assert len(results) == 7 and all(y.dtype == torch.float32 and torch.equal(y, x) for y, x in results)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_samples_agree_to_their_rounding(dtype):
    """Not Wan's case (its latents are float32): diffusers sums some terms in another order, so samples of a
    16-bit dtype agree to a few of its units in the last place (measured: <= 2.4)."""
    ref, ours = _pair(10)
    gen = torch.Generator().manual_seed(0)
    x = y = torch.randn(1, 4, 3, 4, 6, generator=gen).to(dtype)
    for t in ref.timesteps:
        out = torch.randn(x.shape, generator=gen).to(dtype)
        x = ref.step(out, t, x, return_dict=False)[0]
        y = ours.step(out, t, y, return_dict=False)[0]
        assert y.dtype == dtype
        assert ((y - x).float().abs().max() / x.float().abs().max()).item() <= 4 * torch.finfo(dtype).eps


def test_stepping_past_the_end_raises():
    ref, ours = _pair(2)
    list(_run_both(ref, ours))
    with pytest.raises(IndexError):
        ours.step(torch.zeros(1), ref.timesteps[-1], torch.zeros(1))


def test_step_returns_what_diffusers_returns():
    ref, ours = _pair(3)
    sample, out = torch.randn(1, 4, 2), torch.randn(1, 4, 2)
    a, b = ref.step(out, ref.timesteps[0], sample), ours.step(out, ours.timesteps[0], sample)
    assert type(a) is type(b) and torch.equal(a.prev_sample, b.prev_sample)
    assert isinstance(ours.step(out, ours.timesteps[1], b.prev_sample, return_dict=False), tuple)


def _fresh(steps=4, begin=0, **config):
    s = UniPCMultistepScheduler(**{**WAN21, **config})
    if steps:
        s.set_timesteps(steps)
    if begin is not None:
        s.set_begin_index(begin)
    return s


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: _fresh(prediction_type="epsilon", use_flow_sigmas=False), "flow sigmas"),
        (lambda: _fresh(use_flow_sigmas=False), "flow sigmas"),
        (lambda: _fresh(predict_x0=False), "predict_x0"),
        (lambda: _fresh(solver_order=4), "solver_order 4"),
        (lambda: _fresh(thresholding=True), "thresholding"),
        (lambda: _fresh(steps=0), "set_timesteps"),
        (lambda: _fresh(begin=None), "begin_index"),
        (lambda: _fresh(solver_type="bh1"), "not finite"),  # ends at sigma 0: NaN in diffusers too
        (lambda: _fresh(lower_order_final=False), "not finite"),  # order 2 looking back from sigma 0
        (lambda: _fresh(solver_order=3, lower_order_final=False), "singular"),  # diffusers raises there
        # Ends on a zero-length step (h = 0): diffusers' finite there, but r_k = inf is not ours to take.
        (lambda: _fresh(lower_order_final=False, final_sigmas_type="sigma_min"), "not finite"),
        (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "not a UniPC"),
    ],
)
def test_unsupported_configurations_fall_back_to_diffusers(make, why, caplog):
    scheduler = make()
    with caplog.at_level(logging.DEBUG, logger="diffserve.runtime.schedulers.unipc"):
        assert sync_free_scheduler(scheduler) is scheduler
    assert why in caplog.text


def test_the_fallbacks_for_sigma_zero_are_diffusers_own_failures():
    """Why bh1 / lower_order_final=False ending at sigma 0 are not ours to take: diffusers gives NaN."""
    for config in (dict(solver_type="bh1"), dict(lower_order_final=False)):
        ref = _fresh(**config)
        x = torch.randn(1, 4, 2)
        for t in ref.timesteps:
            x = ref.step(torch.randn(1, 4, 2), t, x, return_dict=False)[0]
        assert not torch.isfinite(x).all()


def test_wan_generation_uses_the_sync_free_scheduler(tiny_wan_dir, monkeypatch):
    chosen = []

    def spy(scheduler):
        chosen.append(sync_free_scheduler(scheduler))
        return chosen[-1]

    monkeypatch.setattr(wan_module, "sync_free_scheduler", spy)
    runner = load_runner(str(tiny_wan_dir), device="cpu")
    req = GenerationRequest("a cat", width=32, height=32, num_frames=5, num_inference_steps=3, seed=0)
    runner.generate(req)
    assert len(chosen) == 1 and isinstance(chosen[0], HostUniPC) and chosen[0].step_index == 3


# ---- GPU -------------------------------------------------------------------------------------------------


@cuda
def test_step_loop_never_syncs_on_cuda_while_diffusers_does():
    shape = (1, 16, 3, 8, 8)
    ref, ours = _pair(10, device="cuda")
    assert isinstance(ours, HostUniPC) and ours.timesteps.device.type == "cuda"
    gen = torch.Generator("cuda").manual_seed(0)
    start = torch.randn(shape, generator=gen, device="cuda")
    outputs = [torch.randn(shape, generator=gen, device="cuda") for _ in range(10)]
    torch.cuda.synchronize()

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = start
        for out, t in zip(outputs, ours.timesteps, strict=True):
            y = ours.step(out, t, y, return_dict=False)[0]
        with pytest.raises(RuntimeError, match="synchroniz"):
            ref.step(outputs[0], ref.timesteps[0], start, return_dict=False)
    finally:
        torch.cuda.set_sync_debug_mode(previous)

    # The same numbers as diffusers on the GPU.
    ref, _ = _pair(10, device="cuda")
    x = start
    for out, t in zip(outputs, ref.timesteps, strict=True):
        x = ref.step(out, t, x, return_dict=False)[0]
    assert ((y - x).abs().max() / x.abs().max()).item() <= GPU_BOUND


@cuda
@pytest.mark.parametrize("model", ["tiny_wan_dir", "tiny_wan22_dir"])
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_wan_generation_never_syncs_in_the_loop(model, graphs, request, monkeypatch):
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, graphs)
    monkeypatch.setenv(cuda_graphs.CHECK_SYNC_ENV, "1")
    runner = load_runner(str(request.getfixturevalue(model)), device="cuda", dtype="bfloat16")
    steps = []
    req = GenerationRequest("a cat", width=32, height=32, num_frames=5, num_inference_steps=5, seed=1)
    result = runner.generate(req, on_step=lambda done, total: steps.append(done))
    assert steps == [1, 2, 3, 4, 5] and len(result.videos[0]) == 5
    assert torch.cuda.get_sync_debug_mode() == 0
