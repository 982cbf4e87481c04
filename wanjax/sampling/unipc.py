"""FlowUniPC multistep sampler (UniP predictor + UniC corrector, B(h) = expm1, order 2).

The same update as the official ``FlowUniPCMultistepScheduler`` (``Wan-Video/Wan2.2:wan/utils/fm_solvers_unipc.py``)
and diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2,
solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")``:

* flow sigmas: ``alpha = 1 - sigma``; half log-SNR ``lambda = log(alpha) - log(sigma)``;
* the model predicts the flow ``v``; the solver works on ``x0 = x - sigma * v``;
* step ``i`` first corrects the incoming sample with UniC (from step 1 on, using the new ``x0``), then predicts the next
  sample with UniP; the predictor order is ``min(2, i + 1, N - i)`` (warm-up, and first order on the last step, which
  lands exactly on ``x0`` because the final sigma is 0); the corrector at step ``i`` uses the predictor order of step
  ``i - 1``.

Design (jit-friendly): all scalar coefficients of every step are precomputed on the host (float64, stored float32) into
a table ``[N, 10]``; a step is then a fixed linear combination of tensors, indexed by ``step_index`` which may be a traced
integer. One compiled step function serves every step::

    state = unipc_init(schedule.sigmas, x.shape)
    for i in range(N):
        v = model(x, schedule.timesteps[i])
        x, state = unipc_step(state, i, v, x)

Shapes are arbitrary (channels-last ``[B, F, H, W, C]`` latents or anything else); math is float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = ["UniPCState", "unipc_coefficients", "unipc_init", "unipc_step"]

# Column layout of the coefficient table.
_SIGMA = 0  # sigma_i, for x0 = x - sigma_i * v
_C_CUR = 1  # corrector: weight of the incoming sample (1 on step 0, where there is no corrector)
_C_X = 2  # corrector: weight of the previous corrected sample
_C_M0 = 3  # corrector: weight of x0_{i-1}
_C_D1 = 4  # corrector: weight of (x0_{i-2} - x0_{i-1})
_C_DT = 5  # corrector: weight of (x0_i - x0_{i-1})
_P_X = 6  # predictor: weight of the corrected sample
_P_M0 = 7  # predictor: weight of x0_i
_P_D1 = 8  # predictor: weight of (x0_{i-1} - x0_i)
_ORDER = 9  # predictor order used at this step (informational)
_NUM_COLS = 10


class UniPCState(NamedTuple):
    """Sampler state (a pytree).

    Attributes:
      coeffs: float32 [N, 10] per-step coefficients (from `unipc_coefficients`); constant over the loop.
      x_last: float32 sample shape; the corrected sample of the previous step (UniC input).
      m_prev: float32 sample shape; x0 prediction of the previous step.
      m_prev2: float32 sample shape; x0 prediction two steps back.
    """

    coeffs: jnp.ndarray
    x_last: jnp.ndarray
    m_prev: jnp.ndarray
    m_prev2: jnp.ndarray


def _lam(s: float) -> float:
    """Half log-SNR of a flow sigma: log(1 - s) - log(s) (+inf at s = 0)."""
    if s == 0.0:
        return np.inf
    return float(np.log1p(-s) - np.log(s)) if s < 1.0 else -np.inf


def _phis(h: float, solver_type: str):
    """(hh, h*phi_1, B(h)) for the x0-predicting UniPC, with hh = -h."""
    hh = -h
    h_phi_1 = float(np.expm1(hh))
    b_h = h_phi_1 if solver_type == "bh2" else hh
    return hh, h_phi_1, b_h


def unipc_coefficients(
    sigmas, solver_order: int = 2, solver_type: str = "bh2", lower_order_final: bool = True, use_corrector: bool = True
) -> np.ndarray:
    """Per-step coefficient table ``[N, 10]`` (float32) for sigmas ``[N + 1]``.

    Args:
      sigmas: decreasing flow sigmas with the final value appended (``FlowSchedule.sigmas``); ``sigmas[0] < 1``.
      solver_order: 1 or 2 (the official default is 2).
      solver_type: ``"bh2"`` (official default) or ``"bh1"``.
      lower_order_final: use first order on the last step (required when the final sigma is 0 and order is 2).
      use_corrector: apply UniC (official: yes, on every step after the first).
    """
    sig = np.asarray(sigmas, dtype=np.float32)
    if sig.ndim != 1 or sig.shape[0] < 2:
        raise ValueError(f"unipc_coefficients: sigmas must be 1-D with N + 1 >= 2 entries, got shape {sig.shape}")
    if solver_order not in (1, 2):
        raise ValueError(f"unipc_coefficients: solver_order must be 1 or 2, got {solver_order}")
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"unipc_coefficients: solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    if not (np.all(np.diff(sig) < 0) and sig[0] < 1.0 and sig[-1] >= 0.0):
        raise ValueError(
            f"unipc_coefficients: sigmas must be strictly decreasing in [0, 1), got first={sig[0]!r} last={sig[-1]!r}"
        )
    if sig[-1] == 0.0 and solver_order == 2 and not lower_order_final and sig.shape[0] > 2:
        raise ValueError(
            "unipc_coefficients: a final sigma of 0 needs lower_order_final=True with solver_order=2 "
            "(the second-order step to sigma=0 divides by zero)"
        )
    s = sig.astype(np.float64)  # the references keep sigmas in float32; coefficients are derived in float64
    n = s.shape[0] - 1
    lam = [_lam(v) for v in s]
    table = np.zeros((n, _NUM_COLS), dtype=np.float64)
    orders = []
    for i in range(n):
        order = min(solver_order, i + 1)
        if lower_order_final:
            order = min(order, n - i)
        orders.append(order)
        row = table[i]
        row[_SIGMA] = s[i]
        row[_ORDER] = order

        # UniC corrector: moves the incoming sample (predicted at step i - 1) using the new x0_i.
        if i == 0 or not use_corrector:
            row[_C_CUR] = 1.0
        else:
            p = orders[i - 1]
            alpha_t = 1.0 - s[i]
            h = lam[i] - lam[i - 1]
            hh, h_phi_1, b_h = _phis(h, solver_type)
            row[_C_X] = s[i] / s[i - 1]
            row[_C_M0] = -alpha_t * h_phi_1
            if p == 1:
                rho_t = 0.5
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                h_phi_k1 = h_phi_1 / hh - 1.0
                h_phi_k2 = h_phi_k1 / hh - 0.5
                b = np.array([h_phi_k1 / b_h, 2.0 * h_phi_k2 / b_h])
                rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), b)
                row[_C_D1] = -alpha_t * b_h * rho[0] / rk
                rho_t = rho[1]
            row[_C_DT] = -alpha_t * b_h * rho_t

        # UniP predictor: from sigma_i to sigma_{i+1}.
        alpha_t = 1.0 - s[i + 1]
        h = lam[i + 1] - lam[i]
        hh, h_phi_1, b_h = _phis(h, solver_type)
        row[_P_X] = s[i + 1] / s[i]
        row[_P_M0] = -alpha_t * h_phi_1
        if order == 2:
            rk = (lam[i - 1] - lam[i]) / h
            row[_P_D1] = -alpha_t * b_h * 0.5 / rk
    if not np.all(np.isfinite(table)):
        raise ValueError(f"unipc_coefficients: non-finite coefficients for sigmas {sig.tolist()}")
    return table.astype(np.float32)


def unipc_init(sigmas, sample_shape, **solver_kw) -> UniPCState:
    """Initial state for sampling along ``sigmas`` ([N + 1], final 0) with samples of ``sample_shape``.

    ``solver_kw`` are passed to `unipc_coefficients` (defaults: order 2, bh2, lower-order final, corrector on).
    """
    coeffs = jnp.asarray(unipc_coefficients(sigmas, **solver_kw))
    zeros = jnp.zeros(tuple(sample_shape), jnp.float32)
    return UniPCState(coeffs=coeffs, x_last=zeros, m_prev=zeros, m_prev2=zeros)


def unipc_step(state: UniPCState, step_index, model_output, sample):
    """One FlowUniPC step.

    Args:
      state: from `unipc_init` or the previous `unipc_step`.
      step_index: int in ``[0, N)`` (Python int or traced int32); steps must be taken in order 0, 1, ..., N-1.
      model_output: the flow prediction ``v`` at ``(sample, timesteps[step_index])``.
      sample: the current sample ``x`` (what the model was evaluated on).

    Returns:
      ``(next_sample, new_state)``; ``next_sample`` is float32, at ``sigmas[step_index + 1]``.
    """
    if model_output.shape != sample.shape or sample.shape != state.x_last.shape:
        raise ValueError(
            f"unipc_step: model_output {model_output.shape}, sample {sample.shape} and state "
            f"{state.x_last.shape} must have the same shape"
        )
    c = state.coeffs[step_index]
    x = sample.astype(jnp.float32)
    m = x - c[_SIGMA] * model_output.astype(jnp.float32)
    m0 = state.m_prev
    x_c = c[_C_CUR] * x + c[_C_X] * state.x_last + c[_C_M0] * m0 + c[_C_D1] * (state.m_prev2 - m0) + c[_C_DT] * (m - m0)
    x_next = c[_P_X] * x_c + c[_P_M0] * m + c[_P_D1] * (m0 - m)
    return x_next, UniPCState(coeffs=state.coeffs, x_last=x_c, m_prev=m, m_prev2=m0)
