"""UniPC (flow-matching, x0 prediction) with every coefficient worked out on the host before the loop.

diffusers' UniPCMultistepScheduler, which Wan ships with, makes the host wait for the GPU at every step: it
copies CPU sigma scalars to the device with blocking copies, and torch.linalg.solve on device tensors checks
its result on the host. Yet every scalar of a step (the sigma ratio, h, the r_k, B(h), the rho weights of
the predictor and corrector, which order each step uses, whether the corrector runs) depends only on the
sigma schedule. HostUniPC computes them all once, in float32 on the CPU in the same order of operations as
diffusers (so the coefficients are the same float32 numbers), and each step is then only tensor arithmetic
with Python-float coefficients on the sample and the history of x0 predictions: nothing to wait for.

UniPC in brief (Zhao et al. 2023): with lambda = log(alpha / sigma), h = lambda_target - lambda_source and
m_k the x0 predictions of the last steps, the predictor is
    x_next = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) m_0 - alpha_t B(h) sum_k rho_k (m_k - m_0) / r_k
with r_k = (lambda_k - lambda_s) / h and rho solving a small Vandermonde system in r_k; the corrector
redoes the previous update once the model has been evaluated at its result, with one more term.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SOLVER_TYPES = ("bh1", "bh2")
MAX_ORDER = 3


@dataclass(frozen=True)
class Update:
    """One UniPC update from sigmas[source] to sigmas[target]: x_out = ratio * x - x0_weight * m_0
    - b_weight * (sum_k rhos[k] * (m_{k+1} - m_0) / rks[k] [+ rhos[-1] * (m_new - m_0) for a corrector])."""

    ratio: float
    x0_weight: float
    b_weight: float
    rks: tuple[float, ...]
    rhos: tuple[float, ...]


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    # Flow sigmas: alpha = 1 - sigma. float32 like diffusers; sigma = 0 gives +inf, and the final update's
    # terms then reduce to x_next = m_0 (checked finite in HostUniPC).
    return torch.log(1 - sigma) - torch.log(sigma)


def _update(sigmas: torch.Tensor, target: int, source: int, order: int, bh2: bool, corrector: bool) -> Update:
    """The coefficients of one update of `order` (history terms: order - 1, plus m_new for a corrector)."""
    sig_t, sig_s = sigmas[target], sigmas[source]
    lam_s = _lam(sig_s)
    h = _lam(sig_t) - lam_s
    # Older sources: the predictor at step i looks back from i, the corrector (re-doing i-1 -> i) from i-1.
    rks = [(_lam(sigmas[source - k]) - lam_s) / h for k in range(1, order)]
    hh = -h  # x0 prediction integrates in -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh) if bh2 else hh
    # Right-hand side b_i = i! phi_{i+1}(hh) / B(h), phi_k by its recurrence; R_ij = r_j^(i-1), last r = 1.
    r = torch.stack([*rks, torch.ones(())])
    rows, rhs, phi_k, fact = [], [], h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append(torch.pow(r, i - 1))
        rhs.append(phi_k * fact / b_h)
        fact *= i + 1
        phi_k = phi_k / hh - 1 / fact
    R, b = torch.stack(rows), torch.stack(rhs)
    if corrector:
        # UniC-1 has a closed form; higher orders solve the full system (on the CPU: no device check).
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    else:
        # UniP: order 1 has no history term, order 2 the closed form 1/2, order 3 the leading 2x2 system.
        rhos = [] if order == 1 else [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    alpha_t = 1 - sig_t
    return Update(
        ratio=float(sig_t / sig_s),
        x0_weight=float(alpha_t * h_phi_1),
        b_weight=float(alpha_t * b_h),
        rks=tuple(float(x) for x in rks),
        rhos=tuple(float(x) for x in rhos),
    )


def _as(value: float, dtype: torch.dtype) -> float:
    """`value` as diffusers applies it to a tensor of `dtype`: its coefficients are float32 tensors, which
    torch rounds to a lower-precision tensor's dtype first (a Python float it would not). A CPU op: no sync."""
    if dtype in (torch.float32, torch.float64):
        return value
    return torch.tensor(value, dtype=torch.float32).to(dtype).item()


def _finite(u: Update | None) -> bool:
    if u is None:
        return True
    # Also r_k = 0 (an update to sigma 0 looking back: h is infinite), which would divide by zero per step.
    values = (u.ratio, u.x0_weight, u.b_weight, *u.rks, *u.rhos)
    return all(math.isfinite(v) for v in values) and 0.0 not in u.rks


class HostUniPC:
    """Steps like a diffusers UniPCMultistepScheduler (flow sigmas, flow_prediction, predict_x0) after its
    set_timesteps / set_begin_index, from its begin_index to the end, without any host-device sync.
    `step(model_output, timestep, sample, return_dict)` returns what diffusers' does; the timestep is
    ignored, as diffusers does once its step index is set: steps are counted. Exact for float32 samples
    (the model output may be any dtype); 16-bit samples agree to a few units of their last place."""

    def __init__(self, scheduler):
        config = scheduler.config
        self.config = config
        self.timesteps = scheduler.timesteps
        self.sigmas = [float(s) for s in scheduler.sigmas]  # float32 values as Python floats
        sig = scheduler.sigmas.detach().to("cpu", torch.float32)
        total, start, max_order = len(scheduler.timesteps), scheduler.begin_index, config.solver_order
        bh2 = config.solver_type == "bh2"
        skip = set(scheduler.disable_corrector or [])
        self.start = start
        self.predictors: list[Update] = []
        self.correctors: list[Update | None] = []
        previous_order = None
        for i in range(start, total):
            # The previous update is corrected once the model has seen its result (not after the first step,
            # nor where disable_corrector names the previous step), with the previous predictor's order.
            fix = previous_order is not None and (i - 1) not in skip
            self.correctors.append(_update(sig, i, i - 1, previous_order, bh2, True) if fix else None)
            # Order: capped by the history gathered since the start, and near the end by lower_order_final.
            order = min(max_order, total - i) if config.lower_order_final else max_order
            order = min(order, i - start + 1)
            self.predictors.append(_update(sig, i + 1, i, order, bh2, False))
            previous_order = order
        self.history: list[torch.Tensor] = []  # x0 predictions, newest last
        self.last_sample: torch.Tensor | None = None
        self.step_index = start
        self.num_inference_steps = total

    def finite(self) -> bool:
        return all(_finite(u) for u in (*self.predictors, *self.correctors))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        n = self.step_index - self.start
        if n >= len(self.predictors):
            raise IndexError("HostUniPC stepped past the end of its schedule")
        # The model's velocity to an x0 prediction at the sample it was evaluated on.
        x0 = sample - _as(self.sigmas[self.step_index], model_output.dtype) * model_output
        corrector = self.correctors[n]
        if corrector is not None:
            sample = self._apply(corrector, self.last_sample, x0)
        self.history = [*self.history, x0][-self.config.solver_order :]
        self.last_sample = sample
        prev = self._apply(self.predictors[n], sample, None)
        self.step_index += 1
        if return_dict:  # diffusers' default
            from diffusers.schedulers.scheduling_utils import SchedulerOutput

            return SchedulerOutput(prev_sample=prev)
        return (prev,)

    def _apply(self, u: Update, x: torch.Tensor, new: torch.Tensor | None) -> torch.Tensor:
        """One update from x with the history (and, for a corrector, the new x0 prediction `new`). The
        grouping follows diffusers' so that the float32 rounding is the same step by step."""
        m0 = self.history[-1]
        out = _as(u.ratio, x.dtype) * x - _as(u.x0_weight, m0.dtype) * m0
        terms = None
        for k, rk in enumerate(u.rks):
            term = _as(u.rhos[k], x.dtype) * ((self.history[-(k + 2)] - m0) / _as(rk, m0.dtype))
            terms = term if terms is None else terms + term
        if new is not None:
            last = _as(u.rhos[-1], x.dtype) * (new - m0)
            terms = last if terms is None else terms + last
        if terms is not None:
            out = out - _as(u.b_weight, terms.dtype) * terms
        return out.to(x.dtype)


def sync_free_scheduler(scheduler):
    """`scheduler` as a HostUniPC where that steps exactly like it, else `scheduler` itself (why: debug
    log). Call after set_timesteps and set_begin_index, before the first step."""
    reason = _unsupported(scheduler)
    if reason is None:
        try:
            host = HostUniPC(scheduler)
        except torch.linalg.LinAlgError as error:  # diffusers' own step would raise it too, later
            host, reason = None, f"singular UniPC system ({error})"
        if host is not None and host.finite():
            return host
        # Mostly where diffusers' own step is not finite either (bh1, or lower_order_final=False, ending at
        # sigma 0: B(h) = -inf or r_k = 0 give NaN); also a zero-length last step (final_sigmas_type
        # "sigma_min" without lower_order_final: h = 0, r_k = inf). Keep its behaviour, not invent ours.
        reason = reason or "a coefficient of the schedule is not finite"
    logger.debug("keeping %s as it is: %s", type(scheduler).__name__, reason)
    return scheduler


def _unsupported(scheduler) -> str | None:
    from diffusers import UniPCMultistepScheduler

    if type(scheduler) is not UniPCMultistepScheduler:
        return "not a UniPCMultistepScheduler"
    c = scheduler.config
    checks = [
        (c.use_flow_sigmas, "flow sigmas only"),
        (c.prediction_type == "flow_prediction", f"prediction_type {c.prediction_type!r}"),
        (scheduler.predict_x0, "predict_x0=False"),
        (c.solver_type in SOLVER_TYPES, f"solver_type {c.solver_type!r}"),
        (1 <= c.solver_order <= MAX_ORDER, f"solver_order {c.solver_order}"),
        (not c.thresholding, "thresholding"),
        (scheduler.solver_p is None, "a solver_p"),
        (scheduler.num_inference_steps is not None, "set_timesteps not called yet"),
        (scheduler.begin_index is not None, "no begin_index: the start would be looked up at step time"),
        (scheduler.step_index is None, "already stepped"),
    ]
    return next((why for ok, why in checks if not ok), None)
