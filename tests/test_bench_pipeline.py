"""bench/pipeline.py on CPU with the TINY config: the W4A4 skeleton, the on-device builder (RTN of the bf16 expert's
weights), real vs fake per layer, the artifact round trip and the result JSON (bf16 + w4a4 phases in process)."""
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench import pipeline as bp  # noqa: E402
from wanjax.config import TINY, config_from_dict  # noqa: E402
from wanjax.quant.apply import BLOCK_LINEARS, get_submodule, qlinears  # noqa: E402
from wanjax.quant.qlinear import qlinear_apply  # noqa: E402

NBINS = 3  # the seed's bins: 3 per expert


@pytest.fixture(scope="module")
def experts():
  return bp.random_bf16_expert(TINY, seed=0), bp.build_w4a4_expert(TINY, seed=0, nbins=NBINS, rank=32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setenv("WANJAX_KERNELS", "reference")
  mp.delenv("OUT", raising=False)
  out = tmp_path_factory.mktemp("results")
  results = bp.main(["--config", "TINY", "--res", "tiny", "--inprocess", "--iters", "1", "--skip-diffusers",
                     "--skip-pipeline", "--results-dir", str(out)])
  mp.undo()
  return results, out


def test_skeleton_is_abstract_default_structure_in_real_mode():
  sk = bp.quantized_skeleton(TINY, nbins=NBINS, rank=32)
  qs = qlinears(sk)
  assert sorted(qs) == sorted(BLOCK_LINEARS)
  L = TINY.num_layers
  for path, q in qs.items():
    k, n, r = q.in_features, q.out_features, min(32, q.in_features, q.out_features)
    c = q.config
    assert q.mode == "real" and c.real_mode_problem() is None
    assert (c.w_fmt, c.w_group, c.a_fmt, c.a_group, c.act_mode, c.nbins) == ("int4", k, "int4", None, "dynamic", NBINS)
    want = {"qweight": ((L, n, k // 2), jnp.uint8), "wscale": ((L, n, 1), jnp.float32),
            "smooth": ((L, k), jnp.float32), "down": ((L, k, r), jnp.bfloat16), "up": ((L, r, n), jnp.bfloat16),
            "bias": ((L, n), jnp.bfloat16), "act_clip": ((L, NBINS), jnp.float32),
            "act_exp_offset": ((L, NBINS), jnp.int32), "wtensor_scale": None, "rot_signs": None, "act_scale": None}
    for name, spec in want.items():
      var = getattr(q, name)
      if spec is None:
        assert var is None, (path, name)
        continue
      a = var.get_value()
      assert isinstance(a, jax.ShapeDtypeStruct), (path, name, type(a))  # shapes only, nothing allocated
      assert (tuple(a.shape), jnp.dtype(a.dtype)) == (spec[0], jnp.dtype(spec[1])), (path, name)


def test_hash_draws_agree_host_device_and_per_layer():
  dev = np.asarray(jax.jit(lambda s: bp._draw(s, (37, 64), jnp.bfloat16, "kernel"))(np.uint32(12345)))
  host = bp._draw(np.uint32(12345), (37, 64), jnp.bfloat16, "kernel", xp=np)
  np.testing.assert_array_equal(dev.view(np.uint16), host.view(np.uint16))
  assert 0.1 < float(np.std(host.astype(np.float32))) * 8 < 1.5   # std ~ 1/sqrt(64)
  stacked = bp._stacked_kernel_fn(3, 16, 8, np.dtype(jnp.bfloat16))(np.uint32(7))
  layer1 = jax.jit(lambda s: bp.layer_kernel(s, jnp.uint32(1), 16, 8, jnp.bfloat16))(np.uint32(7))
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
      w_eff = (np_unpack_int4(np.asarray(a["qweight"][layer])) * np.asarray(a["wscale"][layer])).T   # s W - D U
      lowrank = np.asarray(a["down"][layer], np.float32) @ np.asarray(a["up"][layer], np.float32)
      w_hat = (w_eff + lowrank) / np.asarray(a["smooth"][layer])[:, None]
      w = np.asarray(lin.kernel[layer], np.float32)
      err = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
      assert err < 0.15, (path, layer, err)             # int4 RTN per output channel of the same weights
      assert np.linalg.norm(lowrank) > 0.02 * np.linalg.norm(w)   # the low-rank branch is not empty
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
  for path in ("blocks.ffn.fc2",):   # K != N; every layer shares the code path
    q = get_submodule(w4a4, path)
    a = {k: None if v is None else v[1] for k, v in q.arrays().items()}   # block 1
    x = bp.random_array(3, (2, 9, q.in_features), jnp.bfloat16)
    y = {m: np.asarray(jax.jit(lambda a, x, m=m: qlinear_apply(q.config, a, x, a["act_clip"][2], mode=m))(a, x),
                       np.float32) for m in ("real", "fake")}
    scale = np.abs(y["fake"]).max()
    assert np.isfinite(y["real"]).all() and scale > 0
    np.testing.assert_allclose(y["real"], y["fake"], atol=2 ** -7 * scale, rtol=2 ** -7, err_msg=path)


def test_diffusers_kwargs_map_back_to_the_config():
  kw = bp.diffusers_kwargs(TINY)
  back = config_from_dict({"_class_name": "WanTransformer3DModel", **kw})
  assert back == TINY.replace(text_len=back.text_len)   # text_len is not a diffusers argument
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
  assert bf["params"] == sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(bp.random_bf16_expert(TINY))))
  assert q["kernel_backend"] == "reference" and q["nbins_per_expert"] == NBINS and q["rank"] == 32
  assert 0 < q["weight_bytes"] and 0 < bf["weight_bytes"]
  for r in (bf["res"]["tiny"], q["res"]["tiny"]):
    assert "error" not in r, r
    assert r["finite"] and r["compile_s"] > 0 and r["median_s"] > 0 and r["iters"] == 1
    assert {"bytes_in_use", "peak_bytes_in_use", "memory_analysis", "all_s"} <= set(r)
  assert 0 < q["res"]["tiny"]["rel_l2_vs_bf16"] < 0.4     # RTN W4A4 of the same weights, 2 random blocks
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
  results = {"res": ["480p"], "phases": {
      "bf16": {"res": {"480p": {"compile_s": 9.0, "median_s": 2.8, "peak_bytes_in_use": 33e9, "attention": "cudnn"}}},
      "w4a4": {"res": {"480p": {"error": "XlaRuntimeError: boom"}}},
      "diffusers": {"skipped": "no wheel"},
      "pipeline": {"stages": {"t5": {"s": 1.0, "bytes_in_use": 1e9, "peak_bytes_in_use": 12e9},
                              "denoise": {"steps": [{"s": 30.0}, {"s": 4.5}]}},
                   "peak_bytes": 20e9, "meets_target": True, "cfg_mode": "batch2"}}}
  results["summary"] = bp.summarize(results)
  text = bp.table(results)
  assert "| 480p ours BF16 (cudnn attention) | 9.0 | 2.800 | 1.00 | - | 33.0 |" in text
  assert "failed/skipped: XlaRuntimeError: boom" in text
  assert "pipeline peak: 20.0 GB (target <= 24 GB: True); one guided step (batch2, warm): 4.500 s" in text
  assert results["summary"]["480p"]["targets"]["w4a4_vs_bf16_ge_1.4"] is None
