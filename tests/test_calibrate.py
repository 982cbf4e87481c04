"""Calibration (quant/calibrate.py, quant/stats.py) on a tiny random pipeline (CPU, fp32).

Checks: statistics equal a direct numpy computation from the captured layer inputs; the streamed (block-group)
path equals the all-at-once (online) path; an interrupted run resumes to the same result; the reservoir is
Algorithm R; merge / save / load.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.model.dit import WanDiT, current_layer_index
from wanjax.model.layers import linear_interceptor
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.numerics import formats
from wanjax.quant.calibrate import (
    CONTEXT_NAME,
    CalibConfig,
    CalibSample,
    CalibStats,
    calibrate,
    mx_act_quant_transform,
    record_trajectory,
    stat_name,
)
from wanjax.quant.stats import (
    LayerStats,
    _reservoir,
    init_stats,
    load_stats,
    merge_stats,
    save_stats,
    stride_rows,
    update_stats,
)

CFG3 = TINY  # 2 blocks: with blocks_per_group=1 the streamed path runs 2 groups (one with a prefix)
GEN = GenerationConfig(steps=8, shift=5.0, guide_scale=(2.0, 4.0))  # 3 high + 5 low steps: seed bins fit
BASE = CalibConfig(gen=GEN, reservoir=6, rows_per_call=5, blocks_per_group=1)


@pytest.fixture(scope="module")
def pipe():
    high = WanDiT(CFG3, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    low = WanDiT(CFG3, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    return WanI2VPipeline(high, low, vae=None)


def _sample(seed):
    r = np.random.default_rng(seed)
    y = r.standard_normal((1, 2, 4, 4, 20)).astype(np.float32)  # 2*2*2 = 8 tokens
    ctx = r.standard_normal((2, 5, CFG3.text_dim)).astype(np.float32)
    return CalibSample(y=jnp.asarray(y), context=jnp.asarray(ctx), seed=seed)


SAMPLES = [_sample(0), _sample(1)]


@pytest.fixture(scope="module")
def online(pipe, tmp_path_factory):
    return calibrate(pipe, SAMPLES, BASE, work_dir=tmp_path_factory.mktemp("online"), mode="online", progress=False)


@pytest.fixture(scope="module")
def streamed(pipe, tmp_path_factory):
    return calibrate(pipe, SAMPLES, BASE, work_dir=tmp_path_factory.mktemp("stream"), progress=False)


def _captured_inputs(pipe, sample, steps, cfg_mode="cond"):
    """Raw inputs of every block Linear at the given steps, recorded by a plain interceptor (no calibration code)."""
    xs, ts, experts = record_trajectory(
        pipe, sample.y, sample.context, dataclasses.replace(GEN, seed=sample.seed), cfg_mode
    )
    got = {}

    def rec(module, x):
        got.setdefault((current_layer_index(), module.path), []).append(
            np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        )
        return module.apply_default(x)

    for i in steps:
        params = pipe._params_high if experts[i] == "high" else pipe._params_low
        model = nnx.merge(pipe.graphdef, params)
        model.scan_layers = False
        inp = jnp.concatenate([jnp.asarray(xs[i]), sample.y], -1)
        ctx = sample.context[:1] if cfg_mode == "cond" else sample.context
        if cfg_mode == "both":
            inp = jnp.concatenate([inp, inp], 0)
        with linear_interceptor(rec):
            model(inp, jnp.full((inp.shape[0],), ts[i], jnp.float32), ctx)
    return got


def test_stats_equal_numpy_from_captured_inputs(pipe, online, streamed):
    bins = BASE.resolved().bins
    b = "low_mid"
    steps = bins.steps[bins.names.index(b)]
    rows = {}
    for s in SAMPLES:
        for k, v in _captured_inputs(pipe, s, steps).items():
            rows.setdefault(k, []).extend(v)
    for layer, path in (
        ("ffn.fc2", "blocks.ffn.fc2"),
        ("self_attn.q", "blocks.self_attn.q"),
        ("cross_attn.o", "blocks.cross_attn.o"),
    ):
        calls = rows[(1, path)]
        x = np.concatenate(calls, 0)
        for result in (online, streamed):
            st = result.get("low", 1, layer, b)
            np.testing.assert_allclose(st.absmax, np.abs(x).max(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(st.hessian, x.T @ x, rtol=1e-5, atol=1e-4)
            assert int(st.count) == x.shape[0] == len(steps) * len(SAMPLES) * 8
            assert int(st.seen) == len(calls) * 5  # rows_per_call=5 of 8 rows per call
            cand = np.concatenate([c[stride_rows(c.shape[0], 5)] for c in calls], 0)
            for row in np.asarray(st.samples, np.float64):  # every kept row is one of the offered rows
                assert np.min(np.abs(cand - row).max(1)) < 1e-5
    # q, k, v share one entry; cross k/v one per-expert context entry whose rows are the embedded context
    assert stat_name(1, "self_attn.k") == stat_name(1, "self_attn.q") == "blocks.1.self_attn.qkv"
    ctx_rows = np.concatenate(rows[(0, "blocks.cross_attn.k")], 0)
    st = streamed.stats("low", CONTEXT_NAME, b)
    np.testing.assert_allclose(st.hessian, ctx_rows.T @ ctx_rows, rtol=1e-5, atol=1e-4)
    assert int(st.count) == ctx_rows.shape[0] == len(steps) * len(SAMPLES) * CFG3.text_len
    np.testing.assert_allclose(np.concatenate(rows[(1, "blocks.cross_attn.v")], 0), ctx_rows, rtol=1e-6)


def test_streamed_equals_online(pipe, online, streamed):
    # the idle expert went to host memory during the streamed capture and is back on the device
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves((pipe._params_high, pipe._params_low)))
    keys = online.keys()
    assert keys == streamed.keys()
    names = {k[1] for k in keys}
    assert len(names) == 2 * 6 + 1 and {k[2] for k in keys} == set(BASE.resolved().bins.names)
    for e, n, b in keys:
        a, s = online.stats(e, n, b), streamed.stats(e, n, b)
        assert int(a.count) == int(s.count) > 0 and int(a.seen) == int(s.seen)
        np.testing.assert_allclose(a.absmax, s.absmax, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.hessian, s.hessian, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(a.samples, s.samples, rtol=1e-5, atol=1e-5)  # same slots drawn


def test_resume_after_interruption(pipe, streamed, tmp_path):
    done = []

    def stop_after(n):
        def cb(kind, uid):
            done.append((kind, uid))
            if len(done) == n:
                raise KeyboardInterrupt(f"simulated interruption after {uid}")

        return cb

    with pytest.raises(KeyboardInterrupt):  # stops between the two trajectories
        calibrate(pipe, SAMPLES, BASE, work_dir=tmp_path, progress=False, on_unit=stop_after(1))
    with pytest.raises(KeyboardInterrupt):  # stops after 3 of the 12 stats units
        calibrate(pipe, SAMPLES, BASE, work_dir=tmp_path, progress=False, on_unit=stop_after(5))
    assert [k for k, _ in done] == ["trajectory", "trajectory", "stats", "stats", "stats"]
    seen_before = {u for _, u in done}
    done.clear()
    idle_on_host = []

    def record(kind, uid):
        done.append((kind, uid))
        other = pipe._params_low if uid.startswith("high") else pipe._params_high
        idle_on_host.append(all(isinstance(a, np.ndarray) for a in jax.tree.leaves(other)))

    res = calibrate(pipe, SAMPLES, BASE, work_dir=tmp_path, progress=False, on_unit=record)
    assert all(idle_on_host)  # offload_idle_expert: the other expert sat in host memory
    assert all(k == "stats" for k, _ in done) and len(done) == 9 and not seen_before & {u for _, u in done}
    assert res.keys() == streamed.keys()
    for key in res.keys():
        a, b = res.stats(*key), streamed.stats(*key)
        for f in ("absmax", "count", "hessian", "samples", "seen"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{key} {f}")
    with pytest.raises(ValueError, match="different settings"):
        calibrate(pipe, SAMPLES, CalibConfig(gen=GEN, reservoir=7), work_dir=tmp_path, progress=False)


def test_cfg_both_hessian_transform_per_expert_hessian(pipe, tmp_path):
    """CFG rows (cond + uncond); a Hessian transform (here x * (1 + block), exact) gives per-layer entries;
    ``hessian_per_bin=False`` keeps one Hessian per expert (bin "all") and per-bin abs-max / counts."""
    cfg = CalibConfig(
        gen=GEN,
        cfg_mode="both",
        reservoir=0,
        experts=("high",),
        blocks_per_group=1,
        hessian_per_bin=False,
        hessian_transform=lambda expert, block, layer, x: x * (1.0 + block),
    )
    res = calibrate(pipe, SAMPLES[:1], cfg, work_dir=tmp_path, progress=False)
    names = {k[1] for k in res.keys()}
    assert "blocks.1.self_attn.k" in names and "blocks.0.cross_attn.v" in names and CONTEXT_NAME not in names
    assert {k[0] for k in res.keys()} == {"high"} and {k[2] for k in res.keys()} == {
        "high_early",
        "high_mid",
        "boundary_pre",
        "all",
    }
    bins = cfg.resolved().bins
    high_steps = [i for b in bins.expert_bins("high") for i in bins.steps[bins.names.index(b)]]
    rows = _captured_inputs(pipe, SAMPLES[0], high_steps, cfg_mode="both")  # one call per step, in order
    mid = [high_steps.index(i) for i in bins.steps[bins.names.index("high_mid")]]
    for block, layer in ((1, "ffn.fc1"), (0, "cross_attn.v")):
        calls = rows[(block, f"blocks.{layer}")]
        x_all = np.concatenate(calls, 0)
        x_mid = np.concatenate([calls[k] for k in mid], 0)
        st = res.get("high", block, layer, "high_mid")
        assert st.samples is None and st.hessian is None and int(st.count) == x_mid.shape[0]
        np.testing.assert_allclose(st.absmax, np.abs(x_mid).max(0), rtol=1e-5, atol=1e-6)  # raw inputs
        full = res.get("high", block, layer, "all")
        assert int(full.count) == x_all.shape[0]
        np.testing.assert_allclose(full.hessian, (1 + block) ** 2 * (x_all.T @ x_all), rtol=1e-5, atol=1e-4)
        tot = res.expert_total("high", f"blocks.{block}.{layer}")
        np.testing.assert_array_equal(tot.hessian, full.hessian)
        np.testing.assert_allclose(tot.absmax, np.abs(x_all).max(0), rtol=1e-5, atol=1e-6)
    assert int(res.get("high", 1, "ffn.fc1", "high_mid").count) == 2 * 8 * len(mid)  # cond + uncond rows
    on = calibrate(pipe, SAMPLES[:1], cfg, work_dir=tmp_path / "online", mode="online", progress=False)
    assert on.keys() == res.keys()
    for key in on.keys():
        a, b = on.stats(*key), res.stats(*key)
        assert int(a.count) == int(b.count)
        np.testing.assert_allclose(a.absmax, b.absmax, rtol=1e-5, atol=1e-6)
        if a.hessian is not None or b.hessian is not None:
            np.testing.assert_allclose(a.hessian, b.hessian, rtol=1e-5, atol=1e-4)


def test_mx_act_quant_transform():
    """The seed's Hessian input QDQ_MXFP4(x / s) with the activation rule (safe_ceil), s per block and layer."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 64)).astype(np.float32) * 4)
    s = jnp.asarray(rng.uniform(0.5, 2.0, (3, 64)).astype(np.float32))
    fn = mx_act_quant_transform({"low": {"ffn.fc1": s}})
    got = jax.jit(lambda i: fn("low", i, "ffn.fc1", x))(2)
    want = formats.quantize_dequantize(x / s[2], "mxfp4", scale_rule="safe_ceil")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.allclose(np.asarray(got), np.asarray(x / s[2]))
    np.testing.assert_array_equal(
        np.asarray(fn("high", 0, "ffn.fc1", x)),  # no smoothing given: s = 1
        np.asarray(formats.quantize_dequantize(x, "mxfp4", scale_rule="safe_ceil")),
    )


# ------------------------------------------------------------------------------------------ stats unit tests
def test_reservoir_is_algorithm_r():
    n, m, seen = 4, 9, 3
    samples = jnp.asarray(np.arange(n * 2, dtype=np.float32).reshape(n, 2) * -1)
    cand = jnp.asarray(np.arange(m * 2, dtype=np.float32).reshape(m, 2) + 100)
    key = jax.random.key(5)
    got, new_seen = _reservoir(samples, jnp.int32(seen), cand, key)
    j = seen + np.arange(m)
    r = np.asarray(jax.random.randint(key, (m,), 0, jnp.asarray(j + 1, jnp.int32), dtype=jnp.int32))
    want = np.array(samples)
    for a in range(m):  # the sequential algorithm with the same draws
        if j[a] < n:
            want[j[a]] = cand[a]
        elif r[a] < n:
            want[r[a]] = cand[a]
    np.testing.assert_array_equal(np.asarray(got), want)
    assert int(new_seen) == seen + m


def test_update_merge_save_load(tmp_path):
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal((3, 7, 8)).astype(np.float32)
    x2 = rng.standard_normal((5, 8)).astype(np.float32) * 3
    a = update_stats(init_stats(8, reservoir=16), jnp.asarray(x1), jax.random.key(0))
    b = update_stats(init_stats(8, reservoir=16), jnp.asarray(x2), jax.random.key(1))
    m = merge_stats(a, b, seed=3)
    allx = np.concatenate([x1.reshape(-1, 8), x2], 0).astype(np.float64)
    np.testing.assert_allclose(m.absmax, np.abs(allx).max(0), rtol=1e-6)
    np.testing.assert_allclose(m.hessian, allx.T @ allx, rtol=1e-5, atol=1e-5)
    assert int(m.count) == 26 and int(m.seen) == 26 and m.num_samples == 16
    for row in m.samples:
        assert np.min(np.abs(allx - row).max(1)) == 0
    assert len({tuple(r) for r in m.samples}) == 16  # a subset, no row twice
    bf = update_stats(
        init_stats(8, hessian=False, reservoir=4, sample_dtype=jnp.bfloat16),
        jnp.asarray(x2, jnp.bfloat16),
        jax.random.key(2),
    )
    save_stats(tmp_path / "s.npz", {"a": m, "bf": bf}, meta={"k": 1})
    got, meta = load_stats(tmp_path / "s.npz")
    assert meta == {"k": 1} and got["bf"].hessian is None and got["bf"].samples.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(got["bf"].samples, np.float32), np.asarray(bf.samples, np.float32))
    for f in ("absmax", "count", "samples", "seen"):
        np.testing.assert_array_equal(getattr(got["a"], f), getattr(m, f))
    upper = np.triu(m.hessian)  # stored as the upper triangle, read back symmetric
    np.testing.assert_array_equal(got["a"].hessian, upper + np.triu(upper, 1).T)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no temp file left
    with pytest.raises(ValueError, match="channels"):
        update_stats(init_stats(8), jnp.ones((2, 5)))
    with pytest.raises(KeyError, match="no statistics named"):
        load_stats(tmp_path / "s.npz", ["nope"])
    with pytest.raises(ValueError, match="no rows"):
        from wanjax.quant.stats import hessian_mean

        hessian_mean(init_stats(4))
    assert isinstance(m, LayerStats)


def test_errors(pipe, tmp_path):
    with pytest.raises(ValueError, match="cfg_mode"):
        calibrate(pipe, SAMPLES, CalibConfig(gen=GEN, cfg_mode="x"), work_dir=tmp_path)
    with pytest.raises(ValueError, match="no calibration samples"):
        calibrate(pipe, [], CalibConfig(gen=GEN), work_dir=tmp_path)
    with pytest.raises(ValueError, match="prompt"):
        calibrate(pipe, [CalibSample(y=SAMPLES[0].y)], CalibConfig(gen=GEN), work_dir=tmp_path / "b", progress=False)
    with pytest.raises(FileNotFoundError, match="manifest"):
        CalibStats(tmp_path / "none")


def test_sample_preparation_uses_the_pipeline_encoders():
    """image + prompt go through the pipeline's VAE condition and text encoder (a stub records the calls)."""
    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT
    from wanjax.quant.calibrate import _prepare

    class Stub:
        calls = []

        def prepare_condition(self, image, num_frames, max_area):
            self.calls.append(("vae", image, num_frames, max_area))
            return jnp.zeros((1, 2, 4, 4, 20)), (32, 32)

        def encode_text(self, prompts):
            self.calls.append(("text", tuple(prompts)))
            return jnp.ones((2, 5, 8))

    stub = Stub()
    gen = dataclasses.replace(GEN, num_frames=9, max_area=1024)
    y, ctx = _prepare(stub, CalibSample(image="img.png", prompt="a cat"), gen, "cond")
    assert stub.calls == [("vae", "img.png", 9, 1024), ("text", ("a cat", DEFAULT_NEGATIVE_PROMPT))]
    assert y.shape == (1, 2, 4, 4, 20) and ctx.shape == (2, 5, 8)
    y, ctx = _prepare(stub, CalibSample(y=y, context=jnp.ones((1, 5, 8))), gen, "cond")  # cond-only context
    assert ctx.shape == (2, 5, 8) and len(stub.calls) == 2
    with pytest.raises(ValueError, match="needs a \\[2, L, D\\]"):
        _prepare(stub, CalibSample(y=y, context=jnp.ones((1, 5, 8))), gen, "both")
    with pytest.raises(ValueError, match="image"):
        _prepare(stub, CalibSample(prompt="x"), gen, "cond")
