"""Samplers: official schedule, FlowUniPC vs diffusers, Euler by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_diffusers import official_unipc

from wanjax.sampling import (
    euler_init,
    euler_step,
    flow_schedule,
    num_high_noise_steps,
    official_sigma_max,
    sample,
    unipc_coefficients,
    unipc_init,
    unipc_step,
)

# wan22_architecture.md §1.9: the official 40-step list at shift 5.0 (15 high-noise + 25 low-noise).
OFFICIAL_40_SHIFT5 = [
    999,
    994,
    989,
    983,
    978,
    972,
    965,
    959,
    952,
    944,
    937,
    929,
    920,
    911,
    902,
    892,
    882,
    870,
    859,
    846,
    833,
    818,
    803,
    786,
    768,
    749,
    728,
    706,
    681,
    654,
    624,
    591,
    555,
    514,
    468,
    416,
    356,
    288,
    208,
    113,
]


def test_official_40_step_list_shift5():
    s = flow_schedule(40, shift=5.0)
    assert s.timesteps.dtype == np.int64
    assert s.timesteps.tolist() == OFFICIAL_40_SHIFT5
    assert num_high_noise_steps(s) == 15
    assert s.is_high_noise().tolist() == [True] * 15 + [False] * 25
    assert s.sigmas.dtype == np.float32 and s.sigmas.shape == (41,)
    assert s.sigmas[-1] == 0.0 and np.all(np.diff(s.sigmas) < 0)
    # shift applied once: sigma_0 = 5 * 0.999 / (1 + 4 * 0.999), not the double-shifted 0.99996
    assert abs(float(s.sigmas[0]) - 5 * 0.999 / (1 + 4 * 0.999)) < 1e-6


def test_sigma_max_is_float32_0999():
    assert official_sigma_max() == float(np.float32(0.999))


@pytest.mark.parametrize("steps,shift", [(50, 3.0), (40, 3.0), (40, 5.0), (50, 5.0), (30, 8.0), (20, 1.0)])
def test_counts_and_truncation(steps, shift):
    s = flow_schedule(steps, shift=shift)
    assert len(s.timesteps) == steps and s.num_steps == steps
    assert s.timesteps[0] == 999 and s.timesteps[-1] > 0
    assert np.all(np.diff(s.timesteps) < 0)
    # timesteps are the float64 shifted sigmas times 1000, truncated (floor for positives)
    base = np.linspace(official_sigma_max(), 0.0, steps + 1)[:-1]
    shifted = shift * base / (1 + (shift - 1) * base)
    assert s.timesteps.tolist() == [math.floor(v * 1000) for v in shifted]
    # high-noise steps: shifted sigma >= 0.9 <=> base sigma >= 0.9 / (shift - 0.9 (shift - 1))
    thr = 0.9 / (shift - 0.9 * (shift - 1))
    assert num_high_noise_steps(s) == sum(1 for k in range(steps) if official_sigma_max() * (1 - k / steps) >= thr)


def test_counts_reference_values():
    assert num_high_noise_steps(flow_schedule(50, 3.0)) == 13
    assert num_high_noise_steps(flow_schedule(40, 3.0)) == 10  # diffusers' linspace(1, 1/1000) gives 11


def test_diffusers_default_sigmas_differ_from_official():
    diffusers = pytest.importorskip("diffusers")
    d = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    d.set_timesteps(40)
    ts = d.timesteps.numpy()
    assert int(np.sum(ts >= 900)) == 11
    assert num_high_noise_steps(flow_schedule(40, 3.0)) == 10


def _diffusers_unipc(steps, shift):
    diffusers = pytest.importorskip("diffusers")
    d = official_unipc(diffusers, shift)
    # diffusers shifts the sigmas it is given: pass the official unshifted linspace(0.999, 0, N+1)[:-1].
    d.set_timesteps(sigmas=np.linspace(official_sigma_max(), 0.0, steps + 1)[:-1])
    return d


def _fake_flow_np(x, t, w):
    """A fixed deterministic 'model': a function of the sample and the timestep."""
    return (np.tanh(x @ w) * (t / 1000.0) + 0.5 * np.sin(0.01 * t + x) - 0.1 * x).astype(np.float32)


def _fake_flow_jnp(x, t, w):
    t = t.astype(jnp.float32)
    return jnp.tanh(x @ w) * (t / 1000.0) + 0.5 * jnp.sin(0.01 * t + x) - 0.1 * x


@pytest.mark.parametrize("steps,shift", [(40, 5.0), (50, 3.0), (3, 5.0), (2, 5.0), (1, 5.0)])
def test_unipc_matches_diffusers_trajectory(steps, shift):
    torch = pytest.importorskip("torch")
    d = _diffusers_unipc(steps, shift)
    sched = flow_schedule(steps, shift)
    np.testing.assert_array_equal(d.sigmas.numpy(), sched.sigmas)
    np.testing.assert_array_equal(d.timesteps.numpy(), sched.timesteps)

    rng = np.random.default_rng(steps)
    x_init = rng.standard_normal((1, 3, 4, 5, 8)).astype(np.float32)  # [B, F, H, W, C]
    w = (0.3 * rng.standard_normal((8, 8))).astype(np.float32)

    xt = torch.from_numpy(x_init.copy())
    for t in d.timesteps:
        v = torch.from_numpy(_fake_flow_np(xt.numpy(), float(t), w))
        xt = d.step(v, t, xt, return_dict=False)[0]
    ref = xt.numpy()

    state = unipc_init(sched.sigmas, x_init.shape)
    traces = []

    def counted_step(*args):
        traces.append(1)
        return unipc_step(*args)

    step = jax.jit(counted_step)  # step_index traced: one compilation serves every step
    x = jnp.asarray(x_init)
    for i, t in enumerate(sched.timesteps):
        x, state = step(state, i, jnp.asarray(_fake_flow_np(np.asarray(x), float(t), w)), x)
    got = np.asarray(x)
    assert len(traces) == 1
    assert got.dtype == np.float32
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= 1e-5, rel
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_unipc_fori_loop_equals_python_loop_and_is_shape_agnostic():
    sched = flow_schedule(12, 5.0)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((2, 2, 3, 3, 4)).astype(np.float32))
    w = jnp.asarray((0.3 * rng.standard_normal((4, 4))).astype(np.float32))
    model = lambda x, t, i: _fake_flow_jnp(x, t, w)  # noqa: E731
    a = jax.jit(lambda x: sample(model, x, sched, "unipc"))(x0)
    b = sample(model, x0, sched, "unipc", unroll=True)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # a model acting per element gives the same result for any layout of the sample
    elem = lambda x, t, i: jnp.sin(x + t.astype(jnp.float32) / 300.0)  # noqa: E731
    c = sample(elem, x0, sched, "unipc")
    d = sample(elem, x0.reshape(-1), sched, "unipc").reshape(x0.shape)
    np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=1e-6, atol=1e-6)


def test_unipc_recovers_x0_of_exact_straight_flow():
    """For x_t = (1 - s) x0 + s n the exact flow is n - x0; every x0-prediction is x0 and UniPC must land on it."""
    sched = flow_schedule(10, 5.0)
    rng = np.random.default_rng(2)
    x0 = jnp.asarray(rng.standard_normal((3, 5)).astype(np.float32))
    n = jnp.asarray(rng.standard_normal((3, 5)).astype(np.float32))
    out = sample(lambda x, t, i: n - x0, sched.sigmas[0] * n + (1 - sched.sigmas[0]) * x0, sched, "unipc")
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), rtol=0, atol=1e-5)


def test_unipc_coefficient_table_structure():
    sched = flow_schedule(6, 5.0)
    c = unipc_coefficients(sched.sigmas)
    assert c.shape == (6, 10) and c.dtype == np.float32
    assert c[:, 9].tolist() == [1, 2, 2, 2, 2, 1]  # warm-up order 1, lower-order final
    assert c[0, 1] == 1.0 and np.all(c[1:, 1] == 0)  # no corrector on step 0
    np.testing.assert_array_equal(c[:, 0], sched.sigmas[:-1])
    assert c[-1, 6] == 0.0 and c[-1, 7] == 1.0  # last step returns the x0 prediction exactly


def test_unipc_errors():
    with pytest.raises(ValueError, match="strictly decreasing"):
        unipc_coefficients(np.array([0.5, 0.7, 0.0], np.float32))
    with pytest.raises(ValueError, match="lower_order_final"):
        unipc_coefficients(flow_schedule(4, 5.0).sigmas, lower_order_final=False)
    with pytest.raises(ValueError, match="solver_order"):
        unipc_coefficients(flow_schedule(4, 5.0).sigmas, solver_order=3)
    state = unipc_init(flow_schedule(4, 5.0).sigmas, (2, 3))
    with pytest.raises(ValueError, match="same shape"):
        unipc_step(state, 0, jnp.zeros((2, 4)), jnp.zeros((2, 4)))


def test_euler_hand_computed_trajectory():
    # sigmas 0.8 -> 0.5 -> 0.25 -> 0, model v = 2 x - 1, x = 1.5:
    #   v = 2.0, x = 1.5 - 0.3 * 2.0 = 0.9;  v = 0.8, x = 0.9 - 0.25 * 0.8 = 0.7;  v = 0.4, x = 0.7 - 0.25 * 0.4 = 0.6
    state = euler_init(np.array([0.8, 0.5, 0.25, 0.0], np.float32))
    x = jnp.full((2, 3), 1.5, jnp.float32)
    got = []
    for i in range(3):
        x, state = jax.jit(euler_step)(state, i, 2.0 * x - 1.0, x)
        got.append(float(x[0, 0]))
    np.testing.assert_allclose(got, [0.9, 0.7, 0.6], rtol=0, atol=1e-6)


def test_euler_matches_diffusers_flow_match_euler():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = flow_schedule(8, 5.0)
    d = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    d.set_timesteps(sigmas=sched.sigmas[:-1].tolist())
    np.testing.assert_allclose(d.sigmas.numpy(), sched.sigmas, rtol=0, atol=1e-7)
    rng = np.random.default_rng(3)
    x_init = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    w = (0.3 * rng.standard_normal((4, 4))).astype(np.float32)
    xt = torch.from_numpy(x_init.copy())
    for i, t in enumerate(d.timesteps):
        xt = d.step(
            torch.from_numpy(_fake_flow_np(xt.numpy(), float(sched.timesteps[i]), w)), t, xt, return_dict=False
        )[0]
    got = sample(lambda x, t, i: _fake_flow_np(np.asarray(x), float(t), w), x_init, sched, "euler", unroll=True)
    ref = xt.numpy()
    assert np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref) <= 1e-6


def test_euler_errors():
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler_init(np.array([0.2, 0.5, 0.0]))
    with pytest.raises(ValueError, match="unknown solver"):
        sample(lambda x, t, i: x, jnp.zeros(3), flow_schedule(2), "ddim")
