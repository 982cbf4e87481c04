"""Quantized artifacts: bit-exact round trip, tamper / corruption detection, atomic writes, bits per weight."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.model.dit import WanDiT
from wanjax.numerics import formats
from wanjax.quant.apply import BLOCK_LINEARS, active_bin, get_submodule, qlinears, quantize_model
from wanjax.quant.artifact import ArtifactError, layer_bits_per_weight, load_artifact, read_manifest, save_artifact
from wanjax.quant.qlinear import QLinear, QLinearConfig

FMTS = {"blocks.self_attn.q": "mxfp4", "blocks.self_attn.k": "nvfp4", "blocks.ffn.fc2": "int8"}


def mixed_qlayers(model, nbins=3, fmts=None):
    """One QLinear per block path: int4 with smoothing + low-rank by default, MXFP4 / NVFP4 / INT8 for a few."""
    out = {}
    rng = np.random.default_rng(0)
    for path in BLOCK_LINEARS:
        lin = get_submodule(model, path)
        kern = jnp.swapaxes(jnp.asarray(lin.kernel[...], jnp.float32), 1, 2)  # [L, N, K]
        L, n, k = kern.shape
        fmt = (FMTS if fmts is None else fmts).get(path, "int4")
        extra = {}
        if fmt == "mxfp4":
            qt = formats.quantize_mxfp4(kern).pack()
            cfg = QLinearConfig(k, n, "mxfp4", 32, "mxfp4", 32, nbins=nbins)
            extra["act_exp_offset"] = jnp.asarray(rng.integers(-1, 2, (L, nbins)), jnp.int32)
        elif fmt == "nvfp4":
            qt = formats.quantize_nvfp4(kern[0]).pack()
            qt = jax.tree.map(lambda a: jnp.stack([a] * L), qt)
            cfg = QLinearConfig(k, n, "nvfp4", 16, "nvfp4", 16, nbins=nbins)
            extra["wtensor_scale"] = qt.tensor_scale
        elif fmt == "int8":
            qt = formats.quantize_int8(kern)
            cfg = QLinearConfig(k, n, "int8", None, "int8", None, nbins=nbins)
        else:
            qt = formats.quantize_int4(kern).pack()
            cfg = QLinearConfig(k, n, "int4", None, "int4", None, nbins=nbins)
            extra = dict(
                smooth=jnp.asarray(rng.uniform(0.5, 2, (L, k)), jnp.float32),
                down=jnp.asarray(rng.standard_normal((L, k, 4)) * 0.05, jnp.bfloat16),
                up=jnp.asarray(rng.standard_normal((L, 4, n)) * 0.05, jnp.bfloat16),
            )
        out[path] = QLinear(
            cfg,
            qweight=qt.codes,
            wscale=qt.scales,
            bias=lin.bias[...],
            path=path,
            act_clip=jnp.asarray(rng.uniform(0.6, 1.0, (L, nbins)), jnp.float32),
            **extra,
        )
    return out


@pytest.fixture(scope="module")
def qtiny():
    model = WanDiT(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    return quantize_model(model, mixed_qlayers(model))


def flat(model):
    return jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]


def test_round_trip_is_bit_exact(qtiny, tmp_path):
    qdir = save_artifact(tmp_path / "q", {"high": qtiny, "low": qtiny}, report={"note": "test"})  # mixed formats:
    # no recipe gives them (a recipe's formats are checked against the layers': tests/test_provenance.py)
    assert sorted(os.listdir(qdir)) == ["high.safetensors", "low.safetensors", "manifest.json"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp dirs left behind
    loaded, manifest = load_artifact(qdir)
    assert manifest["report"] == {"note": "test"} and manifest["versions"]["jax"] == jax.__version__
    a, b = flat(qtiny), flat(loaded["high"])
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=str(path))
    assert {p: q.config for p, q in qlinears(loaded["low"]).items()} == {
        p: q.config for p, q in qlinears(qtiny).items()
    }
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 4, TINY.in_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 5, TINY.text_dim)), jnp.float32)
    g, st = nnx.split(qtiny)
    g2, st2 = nnx.split(loaded["high"])
    assert g2 == g

    @jax.jit
    def fwd(st):
        with active_bin(2):
            return nnx.merge(g, st)(x, jnp.array([400.0]), ctx)

    np.testing.assert_array_equal(fwd(st), fwd(st2))


def test_prepared_kernel_weights_are_derived_not_written(qtiny, tmp_path):
    from wanjax.quant.apply import prepare_kernel_weights

    prepared = prepare_kernel_weights(qtiny)
    qs = qlinears(prepared)
    assert qs["blocks.self_attn.q"].kweight is not None  # the MXFP4 layer; INT4 / NVFP4 / INT8 ones are left alone
    assert all(q.kweight is None for p, q in qs.items() if p != "blocks.self_attn.q")
    loaded, _ = load_artifact(save_artifact(tmp_path / "q", {"high": prepared}))
    assert [p for p, _ in flat(loaded["high"])] == [p for p, _ in flat(qtiny)]


def test_tampering_and_corruption_are_detected(qtiny, tmp_path):
    qdir = save_artifact(tmp_path / "q", {"high": qtiny})
    path = os.path.join(qdir, "high.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01  # one flipped bit in the last tensor's bytes
    open(path, "wb").write(bytes(data))
    with pytest.raises(ArtifactError, match=r"high.safetensors: sha256 mismatch: manifest says [0-9a-f]{64}"):
        load_artifact(qdir)

    qdir2 = save_artifact(tmp_path / "q2", {"high": qtiny})
    man_path = os.path.join(qdir2, "manifest.json")
    man = json.load(open(man_path))
    man["experts"]["high"]["layers"]["blocks.ffn.fc1"]["config"]["nbins"] = 1  # edited manifest
    json.dump(man, open(man_path, "w"))
    with pytest.raises(ArtifactError, match="manifest checksum mismatch"):
        load_artifact(qdir2)
    man["format"] = "wanjax.quant_artifact/999"
    json.dump(man, open(man_path, "w"))
    with pytest.raises(ArtifactError, match="artifact format 'wanjax.quant_artifact/999'"):
        read_manifest(qdir2)

    qdir3 = save_artifact(tmp_path / "q3", {"high": qtiny})
    os.remove(os.path.join(qdir3, "high.safetensors"))
    with pytest.raises(ArtifactError, match="missing file of expert 'high'"):
        load_artifact(qdir3)
    with pytest.raises(ArtifactError, match="not a quantized artifact"):
        load_artifact(tmp_path)


def test_existing_directory_needs_overwrite(qtiny, tmp_path):
    qdir = save_artifact(tmp_path / "q", {"high": qtiny})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_artifact(qdir, {"high": qtiny})
    save_artifact(qdir, {"low": qtiny}, overwrite=True)
    assert sorted(read_manifest(qdir)["experts"]) == ["low"]
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_bits_per_weight():
    k, n = 2048, 16
    w = jax.random.normal(jax.random.key(0), (n, k))
    qt = formats.quantize_mxfp4(w).pack()
    mx = QLinear(
        QLinearConfig(k, n, "mxfp4", 32, "mxfp4", 32), qweight=qt.codes, wscale=qt.scales, act_clip=jnp.ones(1)
    )
    assert layer_bits_per_weight(mx) == 4.25  # 4-bit codes + one E8M0 byte per 32
    qi = formats.quantize_int4(w).pack()
    i4 = QLinear(
        QLinearConfig(k, n, "int4", None, "int4", None),
        qweight=qi.codes,
        wscale=qi.scales,
        act_clip=jnp.ones(1),
        down=jnp.zeros((k, 16), jnp.bfloat16),
        up=jnp.zeros((16, n), jnp.bfloat16),
    )
    assert layer_bits_per_weight(i4) == 4 + 32 / k  # 4-bit codes + one f32 scale per row
    # the rank-16 bf16 branch adds 16 * (K + N) * 16 bits
    assert layer_bits_per_weight(i4, include_lowrank=True) == pytest.approx(4 + 32 / k + 256 * (k + n) / (k * n))
    # at the Wan shapes (K = 5120 / 13824) per-channel int4 is ~4.006 / ~4.002 bits per weight
    assert 4 + 32 / 5120 < 4.01


def test_cli_quantize_is_registered_and_checks_its_inputs(tmp_path, capsys):
    from wanjax.cli import build_parser, main

    args = build_parser().parse_args(["quantize", "--model", "M", "--out", "Q", "--stats", "S", "--recipe", "seed"])
    assert args.func.__name__ == "cmd_quantize" and args.recipe == "seed"
    assert main(["quantize", "--model", "M", "--out", str(tmp_path / "q")]) == 2
    assert "exactly one of --calib" in capsys.readouterr().err
    assert main(["quantize", "--model", "M", "--out", str(tmp_path / "q"), "--stats", "S", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"image": "a.png"}\n')
    assert main(["quantize", "--model", "M", "--out", str(tmp_path / "q"), "--calib", str(bad)]) == 2
    assert "needs 'image' and 'prompt'" in capsys.readouterr().err


def test_attach_artifact_drives_the_pipeline(qtiny, tmp_path):
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.artifact import attach_artifact
    from wanjax.quant.bins import seed_bins
    from wanjax.sampling import flow_schedule

    bins = seed_bins(flow_schedule(12, shift=5.0))
    qdir = save_artifact(tmp_path / "q", {"high": qtiny, "low": qtiny}, bins=bins.to_dict())
    base = WanDiT(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
    pipe = WanI2VPipeline(base, base, vae=None)
    attach_artifact(pipe, qdir)
    assert pipe.quant_bins == bins
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, 4, 4, TINY.out_dim)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((1, 1, 4, 4, TINY.in_dim - TINY.out_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, TINY.text_dim)), jnp.float32)
    v1 = pipe._velocity(pipe._params_high, x, y, ctx, jnp.float32(990.0), jnp.float32(3.5))
    v2 = pipe._velocity(pipe._params_low, x, y, ctx, jnp.float32(200.0), jnp.float32(3.5))
    assert np.all(np.isfinite(v1)) and np.all(np.isfinite(v2)) and pipe._velocity._cache_size() == 1
    no_bins = save_artifact(tmp_path / "nb", {"high": qtiny, "low": qtiny})
    with pytest.raises(ArtifactError, match="no timestep bins"):
        attach_artifact(pipe, no_bins)


def test_attach_artifact_int8_weights(tmp_path, capsys):
    """Real mode with int8_weights: per-channel INT4 layers get int8 codes (kweight) and the same velocities as
    without; the option needs real mode, and the CLI says so before loading anything."""
    from wanjax.cli import main
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.artifact import attach_artifact
    from wanjax.quant.bins import seed_bins
    from wanjax.sampling import flow_schedule

    bins = seed_bins(flow_schedule(12, shift=5.0))
    model = WanDiT(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    qreal = quantize_model(
        model, mixed_qlayers(model, fmts={"blocks.self_attn.q": "mxfp4"})
    )  # all runnable in real mode
    qdir = save_artifact(tmp_path / "q", {"high": qreal, "low": qreal}, bins=bins.to_dict())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 1, 4, 4, TINY.out_dim)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((1, 1, 4, 4, TINY.in_dim - TINY.out_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, TINY.text_dim)), jnp.float32)
    out = {}
    for int8 in (False, True):
        base = WanDiT(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(5))
        pipe = WanI2VPipeline(base, base, vae=None)
        attach_artifact(pipe, qdir, mode="real", int8_weights=int8)
        kw = {
            jax.tree_util.keystr(k): v.dtype
            for k, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(pipe._params_high))[0]
            if "kweight" in str(k)
        }
        assert any(d == jnp.dtype(jnp.float8_e4m3fn) for d in kw.values())  # the MXFP4 layer, prepared either way
        assert any(d == jnp.dtype(jnp.int8) for d in kw.values()) == int8  # the per-channel INT4 layers
        out[int8] = pipe._velocity(pipe._params_high, x, y, ctx, jnp.float32(990.0), jnp.float32(3.5))
    np.testing.assert_array_equal(np.asarray(out[False]), np.asarray(out[True]))
    with pytest.raises(ValueError, match="int8_weights needs mode='real'"):
        attach_artifact(pipe, qdir, mode="fake", int8_weights=True)
    assert main(["generate", "--model", "M", "--image", "i.png", "--prompt", "p", "--int8-weights"]) == 2
    assert "--int8-weights needs --quant DIR and --quant-mode real" in capsys.readouterr().err
