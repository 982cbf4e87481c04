"""One owner per concept (issue 31): the ``wanjax.quant`` workflow names, the block-linear names, the guided
velocity, the activation-quantizer spec."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY


# ------------------------------------------------------------------------------------------ wanjax.quant names
def test_every_name_of_wanjax_quant_resolves():
    import wanjax.quant as q

    assert len(q.__all__) == len(set(q.__all__))
    for name in q.__all__:
        assert getattr(q, name) is not None, name
    assert q.get_recipe("default") is q.RECIPES["default"] and isinstance(q.RECIPES["default"], q.Recipe)
    with pytest.raises(AttributeError):
        q.no_such_name  # noqa: B018


def test_import_wanjax_quant_is_light_and_names_come_on_use():
    code = (
        "import sys, wanjax.quant as q; assert 'jax' not in sys.modules, 'jax imported'; "
        "from wanjax.quant import calibrate, quantize, CalibConfig; "
        "import wanjax.quant.calibrate as qc; "
        "assert qc is calibrate and callable(qc) and qc.CalibConfig is CalibConfig; "
        "assert quantize.quantize.__name__ == 'quantize'; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_calibrate_and_quantize_submodules_call_their_function(monkeypatch):
    """``wanjax.quant.calibrate`` is the submodule (``import ... as qc`` keeps working) and, called, its function."""
    import wanjax.quant.calibrate as qc
    import wanjax.quant.quantize as qq
    from wanjax.quant import calibrate, quantize

    assert calibrate is qc and quantize is qq
    monkeypatch.setattr(qc, "calibrate", lambda *a, **k: ("calibrate", a, k))
    monkeypatch.setattr(qq, "quantize", lambda *a, **k: ("quantize", a, k))
    assert calibrate(1, 2, work_dir="w") == ("calibrate", (1, 2), {"work_dir": "w"})
    assert quantize("p", "default") == ("quantize", ("p", "default"), {})


# ------------------------------------------------------------------------------------------ block linears
def test_block_linears_are_the_models_block_linears():
    from wanjax.model.dit import WanDiT
    from wanjax.model.layers import Linear
    from wanjax.model.names import BLOCK_LINEAR_NAMES, BLOCK_LINEARS, block_linear_shapes

    model = nnx.eval_shape(lambda: WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    found = [m.path for _, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.path.startswith("blocks.")]
    assert sorted(found) == sorted(BLOCK_LINEARS) and len(BLOCK_LINEARS) == 10
    assert BLOCK_LINEAR_NAMES == tuple(p[len("blocks.") :] for p in BLOCK_LINEARS)
    shapes = block_linear_shapes(TINY)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, Linear) and m.path in shapes:
            assert tuple(m.kernel.shape[-2:]) == shapes[m.path], m.path


def test_the_other_owners_derive_from_the_model():
    import wanjax.quant.apply as apply
    from bench.quantize_block import layer_shapes
    from wanjax.io import keymap
    from wanjax.model.names import BLOCK_LINEARS, block_linear_shapes
    from wanjax.parallel import rules

    assert apply.BLOCK_LINEARS is BLOCK_LINEARS
    assert layer_shapes(TINY) == block_linear_shapes(TINY)
    assert keymap.official_to_wanjax("blocks.3.ffn.0.weight").path == ("blocks", "ffn", "fc1", "kernel")
    assert keymap.official_to_wanjax("blocks.0.cross_attn.o.bias").path == ("blocks", "cross_attn", "o", "bias")
    assert rules.param_logical_axes("blocks.self_attn.v.kernel", (2, 8, 8)) == ("layers", "embed", "heads")
    assert rules.param_logical_axes("blocks.ffn.fc2.qweight", (2, 8, 4)) == ("layers", "embed", "mlp")
    with pytest.raises(ValueError, match="unknown block layer"):
        from wanjax.quant.stats import input_name

        input_name("ffn.fc3")


# ------------------------------------------------------------------------------------------ guided velocity
def test_guided_velocity_is_cfg_over_one_2b_batch():
    import wanjax.pipeline as pipeline
    from wanjax.model.dit import WanDiT
    from wanjax.sampling import guided_velocity

    assert not hasattr(pipeline, "_guided_velocity")
    model = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    g, p = nnx.split(model)
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (1, 2, 4, 4, TINY.out_dim))
    y = jax.random.normal(k[1], (1, 2, 4, 4, TINY.in_dim - TINY.out_dim))
    ctx = jax.random.normal(k[2], (2, 8, TINY.text_dim))
    t, guide = jnp.float32(700.0), jnp.float32(3.5)
    inp = jnp.concatenate([x, y], -1)
    v_c = model(inp, jnp.full((1,), t), ctx[:1])
    v_u = model(inp, jnp.full((1,), t), ctx[1:])
    got = guided_velocity(g, p, x, y, ctx, t, guide)
    np.testing.assert_allclose(np.asarray(got), np.asarray(v_u + guide * (v_c - v_u)), rtol=1e-5, atol=1e-5)
    seen = []
    guided_velocity(g, p, x, y, ctx, t, guide, constrain=lambda a: seen.append(a.shape) or a)
    assert [s[0] for s in seen] == [2, 2, 2]


# ------------------------------------------------------------------------------------------ activation spec
def test_qlinear_config_act_spec_is_the_one_spec():
    from wanjax.numerics import formats
    from wanjax.quant.qlinear import QLinearConfig, act_qdq
    from wanjax.quant.rtn import ActQuantSpec, fake_quant_act

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32) * 3)
    for spec in (
        ActQuantSpec("int4"),
        ActQuantSpec("int8"),
        ActQuantSpec("mxfp4"),
        ActQuantSpec("nvfp4"),
        ActQuantSpec("int4", group_size=32),
        ActQuantSpec("mxfp4", scale_rule="ocp_floor"),
    ):
        c = QLinearConfig(64, 32, **QLinearConfig.act_fields(spec))
        assert c.act_spec == spec
        np.testing.assert_array_equal(
            np.asarray(act_qdq(c, x, 0.8, 1, None)),
            np.asarray(fake_quant_act(x, dataclasses.replace(spec, clip=0.8, exp_offset=1))),
        )
    assert QLinearConfig(64, 32, a_fmt=None).act_spec is None
    assert QLinearConfig(64, 32, **QLinearConfig.act_fields(None)).a_fmt is None
    # the static rule: one scale per bin, s <= 0 -> 1
    c = QLinearConfig(64, 32, a_fmt="int4", act_mode="static")
    for s in (0.25, 0.0):
        want = jnp.clip(jnp.round(x / (s or 1.0)), -7, 7) * (s or 1.0)
        np.testing.assert_array_equal(np.asarray(act_qdq(c, x, 1.0, 0, jnp.float32(s))), np.asarray(want))
    with pytest.raises(ValueError, match="static scale needs an int format"):
        ActQuantSpec("mxfp4").qdq(x, static_scale=1.0)
    # mxfp4 spec = the formats call with the seed's activation rule
    np.testing.assert_array_equal(
        np.asarray(ActQuantSpec("mxfp4").qdq(x)),
        np.asarray(formats.quantize_dequantize(x, "mxfp4", scale_rule="safe_ceil")),
    )


def test_mx_act_quant_transform_takes_a_spec():
    from wanjax.quant.calibrate import mx_act_quant_transform
    from wanjax.quant.rtn import ActQuantSpec

    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32))
    a = mx_act_quant_transform(None, ActQuantSpec("int4"))("low", 0, "ffn.fc1", x)
    b = mx_act_quant_transform(None, "int4")("low", 0, "ffn.fc1", x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(ActQuantSpec("int4").qdq(x)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="non-finite"):
        mx_act_quant_transform()("low", 0, "ffn.fc1", x.at[0, 0].set(jnp.nan))
