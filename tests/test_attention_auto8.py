"""The ``"auto8"`` attention backend: attn8 for self-attention on Hopper up to ATTN8_AUTO_MAX_TOKENS tokens, the
automatic backend everywhere else; the default W4A4 recipe asks for it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.model import attention as A


class _Dev:
    def __init__(self, platform, cc):
        self.platform, self.compute_capability = platform, cc


@pytest.fixture
def attn8_registered(monkeypatch):
    calls = []

    def fake_attn8(q, k, v):
        calls.append(q.shape)
        return jnp.zeros_like(q)

    monkeypatch.setitem(A._REGISTERED, "attn8", fake_attn8)
    return calls


def test_auto8_picks_attn8_only_on_hopper_short_self_attention(monkeypatch, attn8_registered):
    n = A.ATTN8_AUTO_MAX_TOKENS
    monkeypatch.setattr(jax, "devices", lambda *a: [_Dev("gpu", "9.0")])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert A.auto8_backend(32760, 32760, jnp.bfloat16) == "attn8"
    assert A.auto8_backend(n, n, jnp.bfloat16) == "attn8"
    assert A.auto8_backend(75600, 75600, jnp.bfloat16) == "cudnn"  # 720p: attn8 measured 0.96x cuDNN
    assert A.auto8_backend(32760, 512, jnp.bfloat16) == "cudnn"  # cross-attention over the text tokens
    assert A.auto8_backend(512, 512, jnp.bfloat16, self_attention=False) == "cudnn"
    monkeypatch.setattr(jax, "devices", lambda *a: [_Dev("gpu", "8.0")])  # A100: no attn8 kernel
    assert A.auto8_backend(32760, 32760, jnp.bfloat16) == "cudnn"
    monkeypatch.setattr(jax, "devices", lambda *a: [_Dev("gpu", "9.0")])
    A._REGISTERED.pop("attn8")  # not registered (the model used without the pipeline): never an error
    assert A.auto8_backend(32760, 32760, jnp.bfloat16) == "cudnn"


def test_auto8_on_cpu_is_the_automatic_backend(attn8_registered):
    """On the CPU auto8 computes exactly what the automatic backend computes (the recipe's evaluation numbers on CPU
    are those of exact attention), and never calls attn8."""
    assert jax.default_backend() == "cpu"
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (1, 96, 2, 32), jnp.float32) for i in range(3))
    got = A.attention(q, k, v, backend="auto8")
    want = A.attention(q, k, v)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert attn8_registered == []
    A.set_attention_backend("auto8")
    try:
        np.testing.assert_array_equal(np.asarray(A.attention(q, k, v)), np.asarray(want))
    finally:
        A.set_attention_backend(None)


def test_auto8_routes_to_attn8_on_hopper(monkeypatch, attn8_registered):
    monkeypatch.setattr(jax, "devices", lambda *a: [_Dev("gpu", "9.0")])
    q = jnp.ones((1, 64, 2, 32), jnp.bfloat16)
    A.attention(q, q, q, backend="auto8")
    assert attn8_registered == [(1, 64, 2, 32)]


@pytest.mark.parametrize("name", ["default", "w4a8", "w4a8_mixed"])
def test_recipe_asks_for_auto8_and_applies_it_anywhere(name):
    """The W4A4 default and the Hopper pick w4a8 (attn8 costs it 0.21 dB on the mini model) both ask for auto8."""
    from wanjax.quant.artifact import apply_recipe_attention
    from wanjax.quant.recipes import RECIPES, recipe_from_dict, recipe_to_dict

    d = recipe_to_dict(RECIPES[name])
    assert d["attention"] == "auto8" and recipe_from_dict(d) == RECIPES[name]
    try:
        assert apply_recipe_attention(d) == "auto8" and A._OVERRIDE == "auto8"  # no GPU needed: it falls back
    finally:
        A.set_attention_backend(None)
