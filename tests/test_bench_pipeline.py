"""bench/pipeline.py on CPU with the TINY config: the W4A4 skeleton, the on-device builder (RTN of the bf16 expert's
weights), real vs fake per layer, the artifact round trip and the result JSON (bf16 + w4a4 phases in process), the
pipeline phase with BF16 experts (expert swap, per-expert warm steps, clean stop at the time budget, extrapolation)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bench import diffusers_phase, pipeline as bp, pipeline_report, random_weights as rw, w4a4_expert
from wanjax.config import TINY, config_from_dict
from wanjax.quant.apply import BLOCK_LINEARS, get_submodule, qlinears
from wanjax.quant.qlinear import qlinear_apply
from wanjax.numerics.hadamard import hadamard_block_size, hadamard_matrix

NBINS = 3  # the seed's bins: 3 per expert


@pytest.fixture(scope="module")
def experts():
    return rw.random_bf16_expert(TINY, seed=0), w4a4_expert.build_w4a4_expert(TINY, seed=0, nbins=NBINS, rank=32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANJAX_KERNELS", "reference")
    mp.delenv("OUT", raising=False)
    out = tmp_path_factory.mktemp("results")
    results = bp.main(
        [
            "--config",
            "TINY",
            "--res",
            "tiny",
            "--inprocess",
            "--iters",
            "1",
            "--skip-diffusers",
            "--skip-pipeline",
            "--results-dir",
            str(out),
        ]
    )
    mp.undo()
    return results, out


def test_skeleton_is_abstract_default_structure_in_real_mode():
    assert all(
        q.rot_signs is None for q in qlinears(w4a4_expert.quantized_skeleton(TINY, nbins=NBINS, recipe="fast")).values()
    )
    sk = w4a4_expert.quantized_skeleton(TINY, nbins=NBINS, rank=32)
    qs = qlinears(sk)
    assert sorted(qs) == sorted(BLOCK_LINEARS)
    L = TINY.num_layers
    for path, q in qs.items():
        k, n, r = q.in_features, q.out_features, min(32, q.in_features, q.out_features)
        c = q.config
        assert q.mode == "real" and c.real_mode_problem() is None
        assert (c.w_fmt, c.w_group, c.a_fmt, c.a_group, c.act_mode, c.nbins) == (
            "int4",
            k,
            "int4",
            None,
            "dynamic",
            NBINS,
        )
        want = {
            "qweight": ((L, n, k // 2), jnp.uint8),
            "wscale": ((L, n, 1), jnp.float32),
            "smooth": ((L, k), jnp.float32),
            "down": ((L, k, r), jnp.bfloat16),
            "up": ((L, r, n), jnp.bfloat16),
            "bias": ((L, n), jnp.bfloat16),
            "act_clip": ((L, NBINS), jnp.float32),
            "act_exp_offset": ((L, NBINS), jnp.int32),
            "wtensor_scale": None,
            "rot_signs": ((L, k), jnp.float32),
            "act_scale": None,
        }
        for name, spec in want.items():
            var = getattr(q, name)
            if spec is None:
                assert var is None, (path, name)
                continue
            a = var.get_value()
            assert isinstance(a, jax.ShapeDtypeStruct), (path, name, type(a))  # shapes only, nothing allocated
            assert (tuple(a.shape), jnp.dtype(a.dtype)) == (spec[0], jnp.dtype(spec[1])), (path, name)


def test_hash_draws_agree_host_device_and_per_layer():
    dev = np.asarray(jax.jit(lambda s: rw._draw(s, (37, 64), jnp.bfloat16, "kernel"))(np.uint32(12345)))
    host = rw._draw(np.uint32(12345), (37, 64), jnp.bfloat16, "kernel", xp=np)
    np.testing.assert_array_equal(dev.view(np.uint16), host.view(np.uint16))
    assert 0.1 < float(np.std(host.astype(np.float32))) * 8 < 1.5  # std ~ 1/sqrt(64)
    stacked = rw.stacked_kernel_fn(3, 16, 8, np.dtype(jnp.bfloat16))(np.uint32(7))
    layer1 = jax.jit(lambda s: rw.layer_kernel(s, jnp.uint32(1), 16, 8, jnp.bfloat16))(np.uint32(7))
    np.testing.assert_array_equal(np.asarray(stacked[1]).view(np.uint16), np.asarray(layer1).view(np.uint16))
    assert not np.array_equal(np.asarray(stacked[0]), np.asarray(stacked[1]))


def np_unpack_int4(packed):
    """uint8 [N, K/2] -> float32 [N, K]: low nibble = even k, high nibble = odd k, two's complement."""
    nib = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.int32)
    return np.where(nib >= 8, nib - 16, nib).astype(np.float32)


def test_w4a4_expert_is_rtn_of_the_bf16_expert(experts):
    bf16, w4a4 = experts
    for path in BLOCK_LINEARS:
        lin, q = get_submodule(bf16, path), get_submodule(w4a4, path)
        a = q.arrays()
        np.testing.assert_array_equal(np.asarray(lin.bias[...]).view(np.uint16), np.asarray(a["bias"]).view(np.uint16))
        for layer in range(TINY.num_layers):
            w_eff = (np_unpack_int4(np.asarray(a["qweight"][layer])) * np.asarray(a["wscale"][layer])).T  # Q^T sW - DU
            lowrank = np.asarray(a["down"][layer], np.float32) @ np.asarray(a["up"][layer], np.float32)
            k = w_eff.shape[0]
            d = np.asarray(a["rot_signs"][layer])
            assert set(np.unique(d)) == {-1.0, 1.0}
            b = hadamard_block_size(k, q.config.rot_block)
            qm = d[:, None] * np.kron(np.eye(k // b), hadamard_matrix(b))  # Q = diag(d) blockdiag(H), orthogonal
            w = np.asarray(lin.kernel[layer], np.float32)
            target = qm.T @ (w * np.asarray(a["smooth"][layer])[:, None])  # what the layer holds: Q^T (s W)
            err = np.linalg.norm(w_eff + lowrank - target) / np.linalg.norm(target)
            assert err < 0.15, (path, layer, err)  # int4 RTN per output channel of the same weights (~0.11)
            assert np.linalg.norm(lowrank) > 0.02 * np.linalg.norm(w)  # the low-rank branch is not empty
    # the layers kept in 16/32 bit are the bf16 expert's
    for name in ("patch_embedding.kernel", "time_projection.kernel", "head.head.kernel"):
        x, y = get_submodule(bf16, name.rsplit(".", 1)[0]), get_submodule(w4a4, name.rsplit(".", 1)[0])
        np.testing.assert_array_equal(np.asarray(x.kernel[...], np.float32), np.asarray(y.kernel[...], np.float32))


def test_real_mode_matches_fake_per_layer_to_bf16(experts, monkeypatch):
    """A QLinear of the built expert, real (integer GEMM, reference kernels) vs fake, same bf16 input.

    (Whole-model outputs of the two modes are not compared in bf16: one bf16-rounding difference flips int4 rounding
    decisions of the next layer's activations, which the following layers amplify; tests/test_qlinear.py compares
    whole models in fp32.)"""
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    _, w4a4 = experts
    for path in ("blocks.ffn.fc2",):  # K != N; every layer shares the code path
        q = get_submodule(w4a4, path)
        a = {k: None if v is None else v[1] for k, v in q.arrays().items()}  # block 1
        x = rw.random_array(3, (2, 9, q.in_features), jnp.bfloat16)
        y = {
            m: np.asarray(
                jax.jit(lambda a, x, m=m: qlinear_apply(q.config, a, x, a["act_clip"][2], mode=m))(a, x), np.float32
            )
            for m in ("real", "fake")
        }
        scale = np.abs(y["fake"]).max()
        assert np.isfinite(y["real"]).all() and scale > 0
        np.testing.assert_allclose(y["real"], y["fake"], atol=2**-7 * scale, rtol=2**-7, err_msg=path)


def test_mixed_recipe_expert_has_int8_self_attention(experts, monkeypatch):
    """recipe='w4a8_mixed': the self-attention layers get int8 [L, N, K] codes (RTN of the same weights, finer than
    the INT4 ones of the default build), the others stay packed INT4; real mode matches fake mode on an INT8 layer."""
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    bf16, w4a4 = experts
    mixed = w4a4_expert.build_w4a4_expert(TINY, seed=0, nbins=NBINS, rank=32, recipe="w4a8_mixed")
    for path in BLOCK_LINEARS:
        q = get_submodule(mixed, path)
        k, n = q.in_features, q.out_features
        if ".self_attn." in path:
            assert q.config.w_fmt == "int8" and q.qweight[...].shape == (TINY.num_layers, n, k)
            assert q.qweight[...].dtype == jnp.int8 and int(jnp.abs(q.qweight[...]).max()) > 7
        else:
            assert q.config.w_fmt == "int4" and q.qweight[...].dtype == jnp.uint8
    path = "blocks.self_attn.q"
    lin, q8, q4 = get_submodule(bf16, path), get_submodule(mixed, path), get_submodule(w4a4, path)
    a8 = {k: None if v is None else v[1] for k, v in q8.arrays().items()}
    a4 = {k: None if v is None else v[1] for k, v in q4.arrays().items()}
    x = rw.random_array(5, (2, 9, q8.in_features), jnp.bfloat16)
    y = {m: np.asarray(qlinear_apply(q8.config, a8, x, 1.0, mode=m), np.float32) for m in ("real", "fake")}
    scale = np.abs(y["fake"]).max()
    np.testing.assert_allclose(y["real"], y["fake"], atol=2**-7 * scale, rtol=2**-7)
    ref = np.asarray(x, np.float32) @ np.asarray(lin.kernel[1], np.float32)
    y4 = np.asarray(qlinear_apply(q4.config, a4, x, 1.0, mode="fake"), np.float32)
    assert np.linalg.norm(y["fake"] - ref) < 0.5 * np.linalg.norm(y4 - ref)  # W8A8 layer vs the default's W4A4 one


def test_diffusers_kwargs_map_back_to_the_config():
    kw = diffusers_phase.diffusers_kwargs(TINY)
    back = config_from_dict({"_class_name": "WanTransformer3DModel", **kw})
    assert back == TINY.replace(text_len=back.text_len)  # text_len is not a diffusers argument
    assert kw["image_dim"] is None and kw["added_kv_proj_dim"] is None and kw["cross_attn_norm"] is True


def test_run_writes_results_with_both_phases(run):
    results, out = run
    with open(os.path.join(out, "pipeline_tiny.json")) as f:
        saved = json.load(f)
    assert saved["res"] == ["tiny"] and saved["config"] == "TINY" and saved["tokens"] == {"tiny": 3 * 8 * 12 // 4}
    for key in ("phases", "summary", "table", "settings", "notes", "wall_s", "jax"):
        assert key in saved, key
    ph = saved["phases"]
    assert ph["diffusers"] == {"skipped": "--skip-diffusers"} and ph["pipeline"] == {"skipped": "--skip-pipeline"}
    bf, q = ph["bf16"], ph["w4a4"]
    assert bf["params"] == sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(rw.random_bf16_expert(TINY))))
    assert q["kernel_backend"] == "reference" and q["nbins_per_expert"] == NBINS and q["rank"] == 32
    assert 0 < q["weight_bytes"] and 0 < bf["weight_bytes"]
    for r in (bf["res"]["tiny"], q["res"]["tiny"]):
        assert "error" not in r, r
        assert r["finite"] and r["compile_s"] > 0 and r["median_s"] > 0 and r["iters"] == 1
        assert {"bytes_in_use", "peak_bytes_in_use", "memory_analysis", "all_s"} <= set(r)
    assert 0 < q["res"]["tiny"]["rel_l2_vs_bf16"] < 0.4  # RTN W4A4 of the same weights, 2 random blocks
    art = q["artifact"]
    assert "error" not in art, art
    assert art["same_graph"] and art["forward_bit_exact_vs_in_memory"] and art["bytes_on_disk"] > 0
    s = saved["summary"]["tiny"]
    assert s["w4a4_speedup_vs_bf16"] == pytest.approx(s["bf16_median_s"] / s["w4a4_median_s"])
    assert s["w4a4_speedup_vs_diffusers"] is None
    assert saved["table"].splitlines()[0].startswith("| variant | compile s | median s | × vs our BF16 |")
    assert "tiny ours W4A4 real kernels" in saved["table"] and "failed" not in saved["table"]
    assert results["summary"] == saved["summary"]


def test_table_reports_failed_and_skipped_phases():
    results = {
        "res": ["480p"],
        "phases": {
            "bf16": {
                "res": {"480p": {"compile_s": 9.0, "median_s": 2.8, "peak_bytes_in_use": 33e9, "attention": "cudnn"}}
            },
            "w4a4": {"res": {"480p": {"error": "XlaRuntimeError: boom"}}},
            "diffusers": {"skipped": "no wheel"},
            "pipeline": {
                "stages": {
                    "t5": {"s": 1.0, "bytes_in_use": 1e9, "peak_bytes_in_use": 12e9},
                    "denoise": {"steps": [{"s": 30.0}, {"s": 4.5}]},
                },
                "peak_bytes": 20e9,
                "meets_target": True,
                "cfg_mode": "batch2",
            },
        },
    }
    results["summary"] = pipeline_report.summarize(results)
    text = pipeline_report.table(results)
    assert "| 480p ours BF16 (cudnn attention) | 9.0 | 2.800 | 1.00 | - | 33.0 |" in text
    assert "failed/skipped: XlaRuntimeError: boom" in text
    assert (
        "pipeline peak (W4A4 experts): 20.0 GB (target <= 24 GB: True); one guided step (batch2, warm): 4.500 s" in text
    )
    assert results["summary"]["480p"]["targets"]["w4a4_vs_bf16_ge_1.4"] is None


def _pipeline_run(out, *extra):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANJAX_KERNELS", "reference")
    mp.delenv("OUT", raising=False)
    try:
        return bp.main(
            [
                "--config",
                "TINY",
                "--res",
                "tiny",
                "--inprocess",
                "--skip-bf16",
                "--skip-w4a4",
                "--skip-diffusers",
                "--skip-t5",
                "--skip-vae",
                "--pipeline-experts",
                "bf16",
                "--results-dir",
                str(out),
                *extra,
            ]
        )
    finally:
        mp.undo()


def test_pipeline_bf16_variant_with_expert_swap(tmp_path):
    """Both BF16 experts, the inactive one in host memory (placement "swap"): 3 steps (high, high, low); per-expert warm
    step times, the swaps timed, a generation row in the table."""
    results = _pipeline_run(tmp_path, "--pipeline-steps", "3", "--pipeline-placement", "swap")
    ph = results["phases"]
    assert set(ph) == {"bf16", "w4a4", "diffusers", "pipeline_bf16"}  # the W4A4 pipeline was not asked for
    p = ph["pipeline_bf16"]
    assert "error" not in p, p.get("error")
    assert p["experts"] == "bf16" and p["placement"] == "swap" and p["stages"]["experts"]["placement"] == "swap"
    den = p["stages"]["denoise"]
    assert not den["stopped_early"] and den["steps_done"] == den["steps_planned"] == 3
    assert [s["expert"] for s in den["steps"]] == den["experts_used"] == ["high", "high", "low"]
    assert [s["warm"] for s in den["steps"]] == [False, True, True] and den["extra_warm_steps"] == []
    assert [w["to"] for w in den["swaps"]] == ["low"] and den["swaps"][0]["s"] > 0
    for e in ("high", "low"):
        assert den["per_expert"][e]["warm_median_s"] > 0
    g = p["generation"]
    assert not g["extrapolated"] and g["not_included"] == ["t5", "vae_decode", "vae_encode"]
    assert g["s"] == pytest.approx(den["loop_s"])
    s = results["summary"]["pipelines"]["bf16"]
    assert s["denoise_s"] == pytest.approx(den["loop_s"]) and s["denoise_extrapolated_s"] is None
    assert s["step_warm_s_by_expert"]["low"] == pytest.approx(den["per_expert"]["low"]["warm_median_s"])
    assert results["summary"]["pipeline_peak_bytes"] is None  # the W4A4 pipeline's keys: not run
    assert "| pipeline stage (both BF16 experts, swap) |" in results["table"]
    row = [line for line in results["table"].splitlines() if line.startswith("| BF16 experts | swap |")]
    assert len(row) == 1 and "(3/3)" in row[0] and "EXTRAPOLATED" not in row[0], row
    with open(os.path.join(tmp_path, "pipeline_tiny.json")) as f:
        assert json.load(f)["settings"]["pipeline_experts"] == ["bf16"]


def test_pipeline_stops_cleanly_at_its_budget_and_extrapolates(tmp_path):
    """A budget that fits no second step: the loop stops after the first, the 2 high-noise steps (of 4) are reported,
    the rest extrapolated and labelled as such (no warm step fits: the compile step is the basis)."""
    results = _pipeline_run(tmp_path, "--pipeline-steps", "4", "--pipeline-budget-s", "0.001")
    p = results["phases"]["pipeline_bf16"]
    assert "error" not in p, p.get("error")
    den = p["stages"]["denoise"]
    assert den["stopped_early"] and den["steps_done"] == 1 and "time budget" in den["stop_reason"]
    assert sorted(den["extra_warm_steps_skipped"]) == ["high", "low"]
    ex = den["extrapolation"]
    assert (
        ex["steps_left"] == 3 and ex["steps_left_by_expert"] == {"high": 1, "low": 2} and "EXTRAPOLATED" in ex["note"]
    )
    assert set(ex["basis"].values()) == {"first step (compile included)"}
    assert den["extrapolated_s"] == pytest.approx(den["loop_s"] + 3 * den["steps"][0]["s"])
    assert p["generation"]["extrapolated"] and "EXTRAPOLATED" in p["generation"]["note"]
    row = [line for line in results["table"].splitlines() if line.startswith("| BF16 experts |")][0]
    assert "EXTRAPOLATED (1/4 run" in row


def test_step_estimate_and_extrapolation_with_swaps():
    from bench import pipeline_phase as pp

    steps = [
        {"expert": "high", "s": 20.0, "warm": False},
        {"expert": "high", "s": 6.0, "warm": True},
        {"expert": "high", "s": 6.2, "warm": True},
    ]
    assert pp.step_estimate(steps, "high") == (6.1, "high warm median")
    assert pp.step_estimate(steps, "low") == (6.1, "other expert's warm median")
    assert pp.step_estimate(steps[:1], "low") == (20.0, "first step (compile included)")
    ex = pp.extrapolate(["high"] * 4 + ["low"] * 3, 3, steps, [{"s": 2.0}], "swap", "high")
    assert ex["steps_left_by_expert"] == {"high": 1, "low": 3} and ex["swaps_left"] == 1
    assert ex["steps_left_s"] == pytest.approx(4 * 6.1 + 2.0)
    assert pp.extrapolate(["high", "low"], 1, steps, [], "device", "high")["swaps_left"] == 0


def test_pipeline_experts_option():
    assert bp.parse_args([]).pipeline_experts == ["w4a4"]
    assert bp.parse_args(["--pipeline-experts", "w4a4,bf16"]).pipeline_experts == ["w4a4", "bf16"]
    for bad in ("fp8", "bf16,bf16", ""):
        with pytest.raises(SystemExit):
            bp.parse_args(["--pipeline-experts", bad])
    # a phase gets its share, and whatever the phases after it do not need by theirs
    assert bp.phase_timeout("pipeline", 540.0, 540.0, ["pipeline_bf16"]) == pytest.approx(540 * 0.55)
    assert bp.phase_timeout("pipeline_bf16", 250.0, 540.0, []) == pytest.approx(245.0)
    assert bp.phase_timeout("bf16", 500.0, 500.0, ["w4a4", "diffusers", "pipeline"]) == pytest.approx(150.0)


def test_encode_text_stage_times_a_warm_call():
    """The T5 stage (tiny config) records the first call and a second, compiled one (the warm repeat adds the latter)."""
    from bench.dit_step import get_config
    from bench.pipeline_phase import encode_text_stage

    ctx, rec = encode_text_stage(get_config("TINY"), seed=0)
    cfg = get_config("TINY")
    assert ctx.shape == (2, cfg.text_len, cfg.text_dim) and rec["finite"]
    assert rec["encode_first_call_s"] > 0 and rec["encode_warm_s"] > 0
