"""The drift tool (wanjax/evaluation/drift.py): statistics on planted abs-max tables, the weight distance, and an end
to end run on a tiny random pipeline (CPU, fp32, a few seconds)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.evaluation import drift
from wanjax.model.dit import WanDiT
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.quant.calibrate import CalibSample, record_trajectory

GEN = GenerationConfig(steps=8, shift=5.0, guide_scale=(2.0, 4.0))  # 3 high + 5 low steps


def _planted():
    """high: about flat (1.000 .. 1.063) except channel 3, which grows 1 -> 20 over the expert's steps; low: channels
    0..7 at 100 (50 at the last step), the others at 1."""
    s_h, s_l, k = 4, 5, 64
    high = np.tile(1.0 + 0.001 * np.arange(k), (s_h, 1))  # top-8 at the first step: channels 56..63
    high[:, 3] = np.array([1.0, 5.0, 10.0, 20.0])
    low = np.ones((s_l, k))
    low[:, :8] = 100.0
    low[-1, :8] = 50.0
    return {"high": {"blocks.0.ffn.fc1": high}, "low": {"blocks.0.ffn.fc1": low}}, {
        "high": [999, 990, 970, 950],
        "low": [880, 700, 500, 300, 100],
    }


def test_statistics_on_planted_tables():
    table, ts = _planted()
    rep = drift.drift_statistics(table, ts, topk=8, factor=10.0)
    h = rep["layers"]["blocks.0.ffn.fc1"]["high"]
    lo = rep["layers"]["blocks.0.ffn.fc1"]["low"]
    x = rep["layers"]["blocks.0.ffn.fc1"]["experts"]
    assert h["absmax"] == pytest.approx([1.063, 5.0, 10.0, 20.0])
    assert h["range_ratio"] == pytest.approx(20.0 / 1.063)
    assert h["pooled_over_step_mean"] == pytest.approx(np.mean([20.0 / 1.063, 4.0, 2.0, 1.0]))
    med = [1.0315, 1.0325, 1.0325, 1.0325]  # channel 3 leaves the lower half after step 0
    assert h["median"] == pytest.approx(med)
    assert h["n_outliers"] == [0, 0, 0, 1]  # only 20 > 10 x median (10 is not)
    assert h["max_over_median"] == pytest.approx(np.array([1.063, 5.0, 10.0, 20.0]) / med)
    assert h["median_range_ratio"] == pytest.approx(1.0325 / 1.0315)
    assert h["topk"][0] == list(range(56, 64)) and h["topk"][-1] == [3] + list(range(57, 64))
    assert h["topk_jaccard_first"] == pytest.approx([1.0, 7 / 9, 7 / 9, 7 / 9])  # 7 shared of 9 distinct
    assert h["topk_jaccard_prev"] == pytest.approx([7 / 9, 1.0, 1.0])
    assert lo["n_outliers"] == [8] * 5 and lo["range_ratio"] == pytest.approx(2.0)
    assert lo["topk_jaccard_prev"] == [1.0] * 4
    assert x["absmax_ratio"] == pytest.approx(20.0 / 100.0)
    assert x["boundary_jump"] == pytest.approx(100.0 / 20.0)
    assert x["topk_jaccard"] == pytest.approx(1 / 15)  # {3, 57..63} vs {0..7}: one shared of 15
    assert rep["layers"]["blocks.0.ffn.fc1"]["trajectory_range_ratio"] == pytest.approx(100.0 / 1.063)
    assert rep["summary"]["high"]["range_ratio"]["max"] == pytest.approx(20.0 / 1.063)


def _model(seed):
    return WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def test_weight_distance():
    a, b = _model(1), _model(2)
    same = drift.weight_distance(a, _model(1))
    assert all(v == 0.0 for v in same.values())
    d = drift.weight_distance(a, b)
    assert set(d) == {f"blocks.{i}.{n}" for i in range(TINY.num_layers) for n in drift_names()} | {"all_params"}
    wa = np.asarray(a.blocks.ffn.fc2.kernel[...], np.float64)[1]
    wb = np.asarray(b.blocks.ffn.fc2.kernel[...], np.float64)[1]
    want = np.linalg.norm(wa - wb) / (0.5 * (np.linalg.norm(wa) + np.linalg.norm(wb)))
    assert d["blocks.1.ffn.fc2"] == pytest.approx(want, rel=1e-6)
    assert 0.5 < d["blocks.1.ffn.fc2"] < 2.0  # independent random weights: about sqrt(2)


def drift_names():
    from wanjax.model.names import BLOCK_LINEAR_NAMES

    return BLOCK_LINEAR_NAMES


def _sample(seed):
    r = np.random.default_rng(seed)
    y = r.standard_normal((1, 2, 4, 4, 20)).astype(np.float32)
    ctx = r.standard_normal((2, 5, TINY.text_dim)).astype(np.float32)
    return CalibSample(y=jnp.asarray(y), context=jnp.asarray(ctx), seed=seed)


def test_end_to_end_tiny_pipeline(tmp_path):
    pipe = WanI2VPipeline(_model(1), _model(2), vae=None)
    samples = [_sample(0), _sample(1)]
    rep = drift.run_drift(pipe, samples, GEN, topk=4)
    assert rep["timesteps"]["high"] and rep["timesteps"]["low"]
    n_h, n_l = len(rep["timesteps"]["high"]), len(rep["timesteps"]["low"])
    assert n_h + n_l == GEN.steps
    names = set(rep["layers"])
    assert "context.cross_attn.kv" in names and "blocks.1.ffn.fc2" in names
    row = rep["layers"]["blocks.1.ffn.fc2"]
    assert row["K"] == TINY.ffn_dim and len(row["high"]["absmax"]) == n_h and len(row["low"]["absmax"]) == n_l

    # the per-step abs-max equals a direct capture of the fc2 input at that step (a plain interceptor)
    from wanjax.model.dit import current_layer_index
    from wanjax.model.layers import linear_interceptor

    want = {"high": [], "low": []}
    for k, s in enumerate(samples):
        xs, ts, experts = record_trajectory(pipe, s.y, s.context, GenerationConfig(**{**GEN.__dict__, "seed": s.seed}))
        for j, (x, t, e) in enumerate(zip(xs, ts, experts)):
            got = {}

            def grab(module, inp):
                if module.path == "blocks.ffn.fc2" and current_layer_index() == 1:
                    got["x"] = np.abs(np.asarray(inp, np.float64)).max()
                return module.apply_default(inp)

            model = nnx.merge(pipe.graphdef, pipe.expert_params(e))
            model.scan_layers = False
            inp = jnp.concatenate([jnp.asarray(x), s.y], -1)
            with linear_interceptor(grab):
                model(inp, jnp.full((1,), t, jnp.float32), s.context[:1])
            idx = sum(1 for ee in experts[:j] if ee == e)
            lst = want[e]
            if k == 0:
                lst.append(got["x"])
            else:
                lst[idx] = max(lst[idx], got["x"])
    np.testing.assert_allclose(row["high"]["absmax"], want["high"], rtol=1e-5)
    np.testing.assert_allclose(row["low"]["absmax"], want["low"], rtol=1e-5)
    assert 0.5 < rep["weights"]["all_params"] < 2.0

    paths = drift.drift_plots(rep, str(tmp_path / "fig"), "tiny")
    assert len(paths) == 3 and all((tmp_path / "fig" / p.split("/")[-1]).stat().st_size > 1000 for p in paths)
    c = drift.compact(rep)
    json.dumps(c)
    assert "topk" not in c["layers"]["blocks.1.ffn.fc2"]["high"]


def test_compare_table(tmp_path, capsys):
    table, ts = _planted()
    rep = drift.drift_statistics(table, ts, topk=8)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rep))
    drift.main(["--compare", f"planted={path}", f"again={path}"])
    out = capsys.readouterr().out
    assert "| statistic | planted: high | planted: low | again: high | again: low |" in out
    assert "| abs-max range over the expert's steps (max_t / min_t) | 18.8x (18.8x) | 2x (2x) |" in out
