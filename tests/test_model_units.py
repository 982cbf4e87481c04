"""Unit tests of the DiT building blocks (CPU, fp32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import (
    I2V_A14B,
    TINY,
    WanConfig,
    config_from_dict,
    config_from_json,
    diffusers_config_dict,
    official_config_dict,
)
from wanjax.model import attention as attn
from wanjax.model.dit import WanDiT, current_layer_index, sinusoidal_embedding
from wanjax.model.layers import Linear, linear_interceptor
from wanjax.model.rope import apply_rope, rope_cos_sin


def _rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("sq,skv", [(37, 37), (130, 77), (5, 300)])
def test_attention_backends_agree(sq, skv):
    q, k, v = _rand((2, sq, 3, 16), 0), _rand((2, skv, 3, 16), 1), _rand((2, skv, 3, 16), 2)
    ref = attn.attention(q, k, v, backend="xla")
    # direct softmax reference in numpy
    s = np.einsum("bqnd,bknd->bnqk", np.asarray(q), np.asarray(k)) / 4.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np_ref = np.einsum("bnqk,bknd->bqnd", p, np.asarray(v))
    np.testing.assert_allclose(np.asarray(ref), np_ref, rtol=1e-5, atol=1e-5)
    out = attn.chunked_attention(q, k, v, q_block=32, kv_block=48)  # blocks that do not divide the lengths
    np.testing.assert_allclose(np.asarray(out), np_ref, rtol=1e-5, atol=1e-5)


def test_attention_backend_override_and_errors(monkeypatch):
    monkeypatch.setenv("WANJAX_ATTENTION", "chunked")
    assert attn.default_backend(10, 10, jnp.float32) == "chunked"
    monkeypatch.setenv("WANJAX_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        attn.default_backend(10, 10, jnp.float32)
    monkeypatch.delenv("WANJAX_ATTENTION")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.set_attention_backend("nope")
    assert attn.default_backend(10, 10, jnp.float32) == "xla"  # short sequences on CPU
    assert attn.default_backend(32760, 32760, jnp.float32) == "chunked"  # never materialize S x S on CPU


def test_rope_matches_complex_reference():
    grid, d = (3, 4, 5), 128
    split = I2V_A14B.rope_split
    assert split == (44, 42, 42)
    cos, sin = rope_cos_sin(grid, d, split)
    x = _rand((1, 60, 2, d), 3)
    y = np.asarray(apply_rope(x, cos, sin))
    # reference: complex multiply with float64 tables built independently
    xc = np.asarray(x, np.float64).reshape(1, 60, 2, d // 2, 2)
    xc = xc[..., 0] + 1j * xc[..., 1]
    freqs = []
    for part, n in zip(split, grid):
        inv = 1.0 / 10000.0 ** (np.arange(0, part, 2) / part)
        freqs.append(np.exp(1j * np.outer(np.arange(n), inv)))
    f, h, w = grid
    tab = np.concatenate(
        [
            np.broadcast_to(freqs[0][:, None, None], (f, h, w, 22)),
            np.broadcast_to(freqs[1][None, :, None], (f, h, w, 21)),
            np.broadcast_to(freqs[2][None, None, :], (f, h, w, 21)),
        ],
        -1,
    ).reshape(60, 64)
    yc = xc * tab[None, :, None, :]
    ref = np.stack([yc.real, yc.imag], -1).reshape(1, 60, 2, d)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_sinusoidal_cos_first():
    e = np.asarray(sinusoidal_embedding(jnp.array([0.0, 7.0]), 8))
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(e[1, :4], np.cos(7.0 * 10000.0 ** (-np.arange(4) / 4)), rtol=1e-6)


def _tiny_model(**kw):
    return WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0), **kw)


def _inputs(b=1, f=2, h=4, w=6):
    return _rand((b, f, h, w, 36), 5), jnp.array([700.0] * b), _rand((b, 5, TINY.text_dim), 6)


def test_scan_and_unrolled_agree_and_interceptor_sees_every_linear():
    m_scan, m_loop = _tiny_model(), _tiny_model(scan_layers=False)
    x, t, c = _inputs()
    a = m_scan(x, t, c)
    seen = []

    def spy(mod, inp):
        seen.append((mod.path, current_layer_index()))
        return Linear.apply_default(mod, inp) * 1.0

    with linear_interceptor(spy):
        b = m_loop(x, t, c)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    blocks = [p for p in seen if p[0].startswith("blocks.")]
    assert len(blocks) == TINY.num_layers * 10  # q,k,v,o x 2 attentions + ffn fc1, fc2
    assert {i for _, i in blocks} == set(range(TINY.num_layers))
    assert ("head.head", None) in seen and ("patch_embedding", None) in seen


def test_interceptor_changes_output():
    m = _tiny_model()
    x, t, c = _inputs()
    base = m(x, t, c)
    with linear_interceptor(lambda mod, inp: Linear.apply_default(mod, inp) * 0.5):
        half = m(x, t, c)
    assert not np.allclose(np.asarray(base), np.asarray(half))


def test_forward_shapes_and_errors():
    m = _tiny_model()
    x, t, c = _inputs(b=2, f=3, h=6, w=4)
    out = m(x, t, c)
    assert out.shape == (2, 3, 6, 4, 16) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="even"):
        m(x[:, :, :5], t, c)
    with pytest.raises(ValueError, match="36 input channels"):
        m(x[..., :16], t, c)
    with pytest.raises(ValueError, match="text_len"):
        m(x, t, jnp.zeros((2, TINY.text_len + 1, TINY.text_dim)))


def test_bf16_model_close_to_fp32():
    m32 = _tiny_model()
    m16 = WanDiT(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(m16, jax.tree.map(lambda a: a, nnx.state(m32, nnx.Param)))
    x, t, c = _inputs()
    a, b = np.asarray(m32(x, t, c)), np.asarray(m16(x, t, c))
    assert b.dtype == np.float32
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 3e-2


def test_full_size_param_count_without_allocation():
    from wanjax.model.dit import param_count

    assert param_count(I2V_A14B) == 14_288_901_184


def test_config_from_both_layouts(tmp_path):
    for d in (official_config_dict(I2V_A14B), diffusers_config_dict(I2V_A14B)):
        p = tmp_path / "config.json"
        p.write_text(json.dumps(d))
        cfg = config_from_json(p)
        assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.in_dim, cfg.out_dim) == (
            5120,
            13824,
            40,
            40,
            36,
            16,
        )
    cfg = config_from_dict(official_config_dict(TINY))
    assert cfg.dim == TINY.dim and cfg.text_len == TINY.text_len


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="not a Wan config"):
        config_from_dict({"hidden_size": 3})
    bad = diffusers_config_dict(TINY)
    del bad["ffn_dim"]
    with pytest.raises(ValueError, match="ffn_dim"):
        config_from_dict(bad)
    wan21 = diffusers_config_dict(TINY) | {"image_dim": 1280}
    with pytest.raises(ValueError, match="Wan2.1"):
        config_from_dict(wan21)
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        config_from_json(p)
    with pytest.raises(ValueError, match="divisible"):
        WanConfig(dim=10, num_heads=3)
