"""Sharding on 8 forced host CPU devices: mesh, rule table (float + quantized leaves), Ulysses / ring attention,
sharded DiT forward vs single device (fp32, <= 1e-5 relative)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from wanjax.config import I2V_A14B, TINY
from wanjax.model.attention import attention
from wanjax.model.dit import WanDiT
from wanjax.sharding import (
    AXES,
    batch_axes,
    bytes_per_device,
    make_mesh,
    param_logical_axes,
    param_specs,
    sequence_parallel_attention,
    shard_dit,
    shard_params,
    ulysses_attention,
    ulysses_heads_ok,
)
from wanjax.parallel.ring import ring_attention
from wanjax.parallel.rules import logical_to_spec, path_str

MESHES = [(1, 1, 8, 1), (2, 1, 4, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 1, 2, 4), (8, 1, 1, 1)]
WIDE = TINY.replace(dim=128, num_heads=8, ffn_dim=256)  # more heads; head_dim 16
SIX = TINY.replace(dim=96, num_heads=6, ffn_dim=192)  # 6 heads: do not divide context 4 -> ring


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _is_spec(x):
    return isinstance(x, P)


def test_eight_host_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py must force 8 host CPU devices before jax is imported"


def test_make_mesh_sizes_and_errors():
    m = make_mesh(2, 1, -1, 2)
    assert m.axis_names == AXES and dict(m.shape) == {"data": 2, "fsdp": 1, "context": 2, "tensor": 2}
    assert dict(make_mesh().shape)["context"] == 8
    m4 = make_mesh(data=2, context=2, devices=jax.devices()[:4])
    assert m4.devices.size == 4
    with pytest.raises(ValueError, match="multiply to 4, but there are 8 devices"):
        make_mesh(2, 1, 2, 1)
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh(3, 1, -1, 1)
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh(-1, 1, -1, 1)
    with pytest.raises(ValueError, match="positive ints"):
        make_mesh(0, 1, -1, 1)


def test_batch_axes():
    assert batch_axes(make_mesh(2, 2, 2, 1), 2) == ("data",)
    assert batch_axes(make_mesh(2, 2, 2, 1), 4) == ("data", "fsdp")
    assert batch_axes(make_mesh(1, 2, 2, 2), 2) == ("fsdp",)
    assert batch_axes(make_mesh(1, 1, 8, 1), 2) == ()


# ---------------------------------------------------------------------------------------------------- rule table
def _check_valid(specs, params, mesh):
    for (path, leaf), spec in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(specs, is_leaf=_is_spec)
    ):
        name = path_str(path)
        assert len(spec) <= len(leaf.shape), (name, spec, leaf.shape)
        used = []
        for dim, entry in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            assert all(a in AXES for a in axes), (name, spec)
            assert dim % math.prod(mesh.shape[a] for a in axes) == 0, (name, spec, leaf.shape)
            used += axes
        assert len(used) == len(set(used)), (name, spec)
        NamedSharding(mesh, spec).shard_shape(tuple(leaf.shape))  # raises if invalid


@pytest.mark.parametrize("cfg", [TINY, WIDE, SIX, I2V_A14B], ids=["tiny", "wide", "six", "a14b"])
def test_rule_table_maps_every_param(cfg):
    params = nnx.state(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    for shape in MESHES:
        mesh = make_mesh(*shape)
        _check_valid(param_specs(params, mesh), params, mesh)


def test_rule_table_full_size_specs_and_memory():
    params = nnx.state(nnx.eval_shape(lambda: WanDiT(I2V_A14B, rngs=nnx.Rngs(0))))
    mesh = make_mesh(1, 2, 2, 2)
    specs = {
        path_str(p): s
        for (p, _), s in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(param_specs(params, mesh), is_leaf=_is_spec),
        )
    }
    fc = ("fsdp", "context")
    assert specs["blocks.self_attn.q.kernel"] == P(None, fc, "tensor")
    assert specs["blocks.cross_attn.o.kernel"] == P(None, "tensor", fc)
    assert specs["blocks.ffn.fc1.kernel"] == P(None, fc, "tensor")
    assert specs["blocks.ffn.fc2.kernel"] == P(None, "tensor", fc)
    assert specs["blocks.self_attn.q.bias"] == P(None, "tensor")
    assert specs["blocks.modulation"] == P(None, None, None, fc)
    assert specs["patch_embedding.kernel"] == P(None, fc)
    total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(params))
    one = bytes_per_device(params, make_mesh(1, 1, 8, 1))
    assert total / 8 <= one <= 1.01 * total / 8  # every large leaf is split 8 ways
    dp2 = bytes_per_device(params, make_mesh(2, 1, 4, 1))
    assert total / 4 <= dp2 <= 1.01 * total / 4  # replicated over "data"


def test_quantized_leaves_follow_the_float_axes():
    """A quantized Linear (packed codes [L, N, K/2], scales, low-rank down/up, smoothing) shards along its N/K."""
    from wanjax.numerics.tensor import QuantizedTensor

    L, K, N, r = 2, 64, 128, 8
    sd = jax.ShapeDtypeStruct

    def qlinear(k, n):
        return {
            "kernel": sd((L, k, n), jnp.bfloat16),
            "bias": sd((L, n), jnp.float32),
            "qweight": QuantizedTensor(
                codes=sd((L, n, k // 2), jnp.uint8),
                scales=sd((L, n, 1), jnp.float32),
                fmt="int4",
                group_size=k,
                packed=True,
            ),
            "scale": sd((L, n), jnp.float32),
            "down": sd((L, k, r), jnp.bfloat16),
            "up": sd((L, r, n), jnp.bfloat16),
            "smooth": sd((L, k), jnp.float32),
            "clip": sd((L, 3), jnp.float32),
        }  # unknown small per-bin table: replicated

    params = {"blocks": {"self_attn": {"q": qlinear(K, N), "o": qlinear(N, K)}, "ffn": {"fc2": qlinear(N, K)}}}
    mesh = make_mesh(1, 2, 2, 2)
    specs = param_specs(params, mesh)
    fc = ("fsdp", "context")
    q = specs["blocks"]["self_attn"]["q"]
    assert q["kernel"] == P(None, fc, "tensor")
    assert q["qweight"].codes == P(None, "tensor", fc)  # [L, N, K/2]: N like kernel's N, K like kernel's K
    assert q["qweight"].scales == P(None, "tensor", None)
    assert q["scale"] == P(None, "tensor") and q["bias"] == P(None, "tensor")
    assert q["down"] == P(None, fc, None) and q["up"] == P(None, None, "tensor")
    assert q["smooth"] == P(None, fc) and q["clip"] == P(None, None)
    o = specs["blocks"]["ffn"]["fc2"]
    assert o["qweight"].codes == P(None, fc, "tensor") and o["down"] == P(None, "tensor", None)
    for shape in MESHES:
        m = make_mesh(*shape)
        _check_valid(param_specs(params, m), params, m)
    real = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
    placed = shard_params(real, mesh)
    assert placed["blocks"]["self_attn"]["q"]["qweight"].codes.sharding.spec == P(None, "tensor", fc)
    with pytest.raises(ValueError, match="no sharding rule for parameter 'blocks.self_attn.q.mystery'"):
        param_logical_axes("blocks.self_attn.q.mystery", (L, 4096, 4096))
    with pytest.raises(ValueError, match="rule expects at least 3 dims"):
        param_logical_axes("blocks.ffn.fc1.kernel", (L, 64))


# ---------------------------------------------------------------------------------------------------- attention
def _qkv(b, s, n, d, seed=0, s_kv=None):
    rng = np.random.default_rng(seed)
    shapes = [(b, s, n, d), (b, s_kv or s, n, d), (b, s_kv or s, n, d)]
    return [jnp.asarray(rng.standard_normal(sh).astype(np.float32)) for sh in shapes]


@pytest.mark.parametrize(
    "shape,mode",
    [
        ((1, 1, 8, 1), "ulysses"),
        ((2, 1, 4, 1), "ring"),
        ((2, 2, 2, 1), "ulysses"),
        ((1, 2, 2, 2), "ring"),
        ((1, 2, 2, 2), "ulysses"),
    ],
)
def test_sequence_parallel_attention_matches_reference(shape, mode):
    mesh = make_mesh(*shape)
    q, k, v = _qkv(2, 37, 8, 16)  # 37 tokens: padded to the context size
    ref = attention(q, k, v, backend="xla")
    out = jax.jit(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh, mode=mode, ring_block=4))(q, k, v)
    assert _rel(out, ref) <= 1e-5


def test_ring_heads_not_dividing_and_short_sequences():
    mesh = make_mesh(1, 1, 8, 1)
    assert not ulysses_heads_ok(mesh, 6)
    for s in (5, 29):  # 5 < 8: three shards hold only padding
        q, k, v = _qkv(1, s, 6, 16, seed=s)
        out = jax.jit(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh))(q, k, v)  # auto -> ring
        assert _rel(out, attention(q, k, v, backend="xla")) <= 1e-5
    with pytest.raises(ValueError, match="not divisible by context=8"):
        ulysses_attention(q, k, v, mesh)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_cross_attention_kv_replicated_and_local_backends(backend):
    """Cross-attention (q sharded, kv replicated) and Ulysses with each CPU local backend (chunked: a scan)."""
    mesh = make_mesh(2, 1, 4, 1)
    q, k, v = _qkv(2, 37, 8, 16, seed=3, s_kv=16)
    out = jax.jit(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh, backend=backend))(q, k, v)
    assert _rel(out, attention(q, k, v, backend="xla")) <= 1e-5
    k, v = _qkv(2, 37, 8, 16, seed=4)[1:]
    out = jax.jit(lambda q, k, v: ulysses_attention(q, k, v, mesh, backend=backend))(q, k, v)
    assert _rel(out, attention(q, k, v, backend="xla")) <= 1e-5


def test_ring_agrees_with_ulysses_in_bf16():
    mesh = make_mesh(1, 1, 4, 2)
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(1, 64, 8, 16, seed=4))
    ref = attention(q, k, v, backend="xla").astype(jnp.float32)
    ring = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh, block=8))(q, k, v)
    assert ring.dtype == jnp.bfloat16
    assert _rel(ring.astype(jnp.float32), ref) <= 2e-2


# ---------------------------------------------------------------------------------------------------- DiT forward
def _inputs(cfg, f, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, f, h, w, cfg.in_dim)).astype(np.float32))
    ctx = jnp.asarray(rng.standard_normal((2, 7, cfg.text_dim)).astype(np.float32))
    return x, jnp.asarray([999.0, 417.0]), ctx


@pytest.mark.parametrize(
    "cfg,grid,cases",
    [
        (TINY, (3, 6, 10), [((2, 1, 4, 1), "auto")]),
        (WIDE, (3, 6, 14), [((1, 1, 8, 1), "ulysses")]),  # 63 tokens padded to 64, 1 head per device
        (SIX, (1, 6, 10), [((2, 1, 4, 1), "auto")]),
    ],
    ids=["tiny", "wide-63-tokens", "six-heads-ring"],
)
def test_sharded_forward_matches_single_device(cfg, grid, cases):
    model = WanDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x, t, ctx = _inputs(cfg, *grid)
    ref = jax.jit(lambda x, t, c: model(x, t, c))(x, t, ctx)
    for shape, mode in cases:
        mesh = make_mesh(*shape)
        fwd, params = shard_dit(model, mesh, mode=mode)
        q = params["blocks"]["self_attn"]["q"]["kernel"][...]
        assert (
            q.sharding.spec
            == param_specs({"blocks": {"self_attn": {"q": {"kernel": q}}}}, mesh)["blocks"]["self_attn"]["q"]["kernel"]
        )
        out = fwd(params, x, t, ctx)
        assert _rel(out, ref) <= 1e-5, (shape, mode, _rel(out, ref))


def test_w4a4_shape_tree_rules_and_memory():
    """The full-size expert with every block Linear in the W4A4 artifact layout: valid specs on every mesh, and the
    per-device weight memory the docs quote."""
    from wanjax.parallel.memory import abstract_dit_params, total_bytes, w4a4_abstract

    bf16 = abstract_dit_params(I2V_A14B)
    q = w4a4_abstract(bf16, rank=32)
    assert q["blocks"]["self_attn"]["q"]["qweight"].shape == (40, 5120, 2560)
    assert "kernel" not in q["blocks"]["ffn"]["fc1"] and q["patch_embedding"]["kernel"].shape == (144, 5120)
    for shape in MESHES:
        mesh = make_mesh(*shape)
        _check_valid(param_specs(q, mesh), q, mesh)
    assert 7.8e9 < total_bytes(q) < 8.0e9 and 28.6e9 < total_bytes(bf16) < 28.7e9
    per = bytes_per_device(q, make_mesh(1, 1, 8, 1))
    assert total_bytes(q) / 8 <= per <= 1.2 * total_bytes(q) / 8


@pytest.mark.parametrize("recipe", ["default", "seed"])
def test_real_qlinear_state_at_full_size_has_rules(recipe):
    """The state of a full-size expert quantized into real ``QLinear`` layers (abstract: ``nnx.eval_shape``), INT4
    with rotation (default) and MXFP4 (seed: E8M0 scales [N, K/32], 0.8 M per layer): every leaf has a rule and
    valid specs on every mesh; the weight codes and scales shard like the float kernel's N / K."""
    from bench.w4a4_expert import quantized_skeleton

    state = nnx.state(quantized_skeleton(I2V_A14B, nbins=3, recipe=recipe))
    mesh = make_mesh(1, 2, 2, 2)
    specs = param_specs(state, mesh)
    _check_valid(specs, state, mesh)
    q = specs["blocks"]["self_attn"]["q"]
    fc = ("fsdp", "context")
    assert q["qweight"].get_value() == P(None, "tensor", fc)
    assert q["wscale"].get_value() == (P(None, "tensor", fc) if recipe == "seed" else P(None, "tensor", None))
    for leaf, shape, spec in [
        ("kweight", (40, 5120, 5120), P(None, "tensor", fc)),
        ("kscale", (40, 5120), P(None, "tensor")),
    ]:
        assert logical_to_spec(param_logical_axes(f"blocks.self_attn.q.{leaf}", shape), shape, mesh) == spec
    for shape in MESHES:
        m = make_mesh(*shape)
        _check_valid(param_specs(state, m), state, m)


def test_memory_plan_without_devices(capsys):
    """The planning CLI uses abstract meshes (no devices): 32-chip numbers on an 8-device machine."""
    from wanjax.parallel.memory import abstract_mesh, main, weights_per_device

    per = weights_per_device(I2V_A14B, abstract_mesh(data=2, context=16))
    assert per == bytes_per_device(
        nnx.state(nnx.eval_shape(lambda: WanDiT(I2V_A14B, rngs=nnx.Rngs(0)))), abstract_mesh(2, 1, 16, 1)
    )
    main(["--mesh", "2,1,16,1", "--mesh", "1,1,8,1"])
    out = capsys.readouterr().out
    assert "(2, 1, 16, 1) | 3.60 | 1.35" in out and "(1, 1, 8, 1) | 7.17 | 2.31" in out
    with pytest.raises(SystemExit, match="expected 4 sizes"):
        main(["--mesh", "2,4"])


def test_sequence_parallel_context_scope_and_modes():
    from wanjax.model import attention as attn_mod
    from wanjax.sharding import sequence_parallel

    mesh = make_mesh(1, 1, 8, 1)
    assert attn_mod._HOOK.get() is None
    with sequence_parallel(mesh, mode="ring"):
        assert attn_mod._HOOK.get() is not None
    assert attn_mod._HOOK.get() is None
    with pytest.raises(ValueError, match="mode 'splash'"):
        with sequence_parallel(mesh, mode="splash"):
            pass
    q, k, v = _qkv(1, 8, 2, 4)
    with pytest.raises(ValueError, match="expected q \\[B, Sq, N, D\\]"):
        ulysses_attention(q[0], k, v, mesh)
