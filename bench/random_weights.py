"""Random weights of the exact full-size shapes, made on the device, for the speed/memory benchmarks.

Random values come from a counter-based integer hash (murmur3's finalizer over the element index), not from
jax.random: the same values on every device, compiled in a fraction of the time of a threefry sampler per weight
(tens of seconds on a small CPU), and any leaf or layer can be re-drawn alone from its seed. Speed and memory do not
depend on the values.
"""

from __future__ import annotations

import functools
import math
import zlib

import numpy as np

_GOLDEN = 0x9E3779B9


def _mix32(h):
    """murmur3 fmix32 on uint32 (wrapping arithmetic); ``h`` a jax or numpy uint32 array."""
    u32 = type(h.dtype.type(0))
    h = h ^ (h >> u32(16))
    h = h * u32(0x85EBCA6B)
    h = h ^ (h >> u32(13))
    h = h * u32(0xC2B2AE35)
    return h ^ (h >> u32(16))


def hash_uniform(seed, shape: tuple, xp=None):
    """float32 values uniform on [-1, 1) of ``shape`` from a uint32 ``seed`` (an int or a traced scalar).

    ``xp``: ``jax.numpy`` (default; traceable) or ``numpy`` (host), which give identical bits.
    """
    if xp is None:
        import jax.numpy as xp
    n = math.prod(shape)
    if n >= 2**32:
        raise ValueError(f"hash_uniform: {n} elements do not fit a uint32 counter")
    with np.errstate(over="ignore"):
        i = xp.arange(n, dtype=xp.uint32).reshape(shape)
        h = _mix32(i * xp.uint32(_GOLDEN) + _mix32(xp.asarray(seed, xp.uint32)))
        return (h >> xp.uint32(8)).astype(xp.float32) * xp.float32(2.0 / 2**24) - xp.float32(1.0)


def hash_normalish(seed, shape: tuple, xp=None):
    """Zero-mean, unit-variance float32 noise (uniform on +-sqrt(3)): enough for random weights and inputs."""
    u = hash_uniform(seed, shape, xp)
    return u * type(u.dtype.type(0))(math.sqrt(3.0))


def leaf_seed(base_seed: int, path: str) -> int:
    """The uint32 seed of the parameter at dotted ``path`` (stable across models that share the path)."""
    return (zlib.crc32(path.encode()) ^ ((base_seed + 1) * _GOLDEN)) & 0xFFFFFFFF


def layer_seed(seed, layer):
    import jax.numpy as jnp

    return jnp.asarray(seed, jnp.uint32) ^ (jnp.asarray(layer, jnp.uint32) * jnp.uint32(0x632BE5AB) + jnp.uint32(1))


def _leaf_kind(path: str, dtype) -> str:
    """How a parameter is drawn, from its name: kernel, embedding, scale, modulation, bias, zeros or other."""
    import jax.numpy as jnp

    name = path.rsplit(".", 1)[-1]
    if not jnp.issubdtype(dtype, jnp.floating):
        return "zeros"
    return name if name in ("kernel", "embedding", "scale", "modulation", "bias") else "other"


#: leaves with fewer elements are drawn on the host (numpy, same bits) and copied: no compilation per leaf
HOST_DRAW_MAX = 1 << 22


def _draw(seed, shape: tuple, dtype, kind: str, xp=None):
    """One random parameter (unit-variance noise x std): kernels std 1/sqrt(fan_in), embeddings 1, norm scales
    1 + 0.1 noise, modulation tables 1/sqrt(dim), biases and the rest 0.02; integer leaves 0."""
    if xp is None:
        import jax.numpy as xp
    if kind == "zeros":
        return xp.zeros(shape, dtype)
    z = hash_normalish(seed, shape, xp)
    if kind == "scale":
        return (xp.float32(1.0) + xp.float32(0.1) * z).astype(dtype)
    std = {
        "kernel": 1.0 / math.sqrt(shape[-2]) if len(shape) >= 2 else 0.02,
        "embedding": 1.0,
        "modulation": 1.0 / math.sqrt(shape[-1]),
    }.get(kind, 0.02)
    return (z * xp.float32(std)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _draw_fn(shape: tuple, dtype, kind: str):
    """Jitted ``seed -> array`` of :func:`_draw` (one compilation per shape/dtype/kind, whatever the seed)."""
    import jax

    return jax.jit(lambda seed: _draw(seed, shape, dtype, kind))


def draw_leaf(seed: int, shape: tuple, dtype, kind: str):
    """One random parameter on the device: drawn on the host below ``HOST_DRAW_MAX`` elements, else on the device."""
    import jax.numpy as jnp

    if math.prod(shape) < HOST_DRAW_MAX:
        return jnp.asarray(_draw(np.uint32(seed), shape, dtype, kind, xp=np))
    return _draw_fn(tuple(shape), np.dtype(dtype), kind)(np.uint32(seed))


def layer_kernel(seed, layer, k: int, n: int, dtype):
    """Block ``layer``'s random kernel ``[K, N]`` of one stacked Linear (std 1/sqrt(K)).

    The bf16 expert and the W4A4 builder both draw a layer's kernel this way, so the W4A4 expert quantizes exactly
    the bf16 expert's weights without the stacked bf16 tensor ever being on the device in the W4A4 phases.
    """
    return (hash_normalish(layer_seed(seed, layer), (k, n)) * (1.0 / math.sqrt(k))).astype(dtype)


@functools.lru_cache(maxsize=None)
def stacked_kernel_fn(num_layers: int, k: int, n: int, dtype):
    import jax
    import jax.numpy as jnp

    return jax.jit(
        lambda seed: jax.lax.map(lambda l: layer_kernel(seed, l, k, n, dtype), jnp.arange(num_layers, dtype=jnp.uint32))
    )


def _paths(pure: dict) -> list[tuple[tuple, str, object]]:
    """``(key path, dotted name, leaf)`` of every leaf of a nested pure dict."""
    import jax

    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        name = ".".join(str(_key_of(p)) for p in kp)
        out.append((kp, name, leaf))
    return out


def _key_of(p):
    return getattr(p, "key", getattr(p, "idx", p))


def _set_path(pure: dict, kp: tuple, value) -> None:
    node = pure
    for p in kp[:-1]:
        node = node[_key_of(p)]
    node[_key_of(kp[-1])] = value


def fill_random(abstract_module, base_seed: int, overrides=None):
    """A concrete module of ``abstract_module``'s structure (from ``nnx.eval_shape``) with random values made on
    the device.

    ``overrides(dotted_path, abstract_leaf) -> array or None``: a leaf's value when not None (e.g. the stacked
    block kernels, quantized layers); every other leaf is drawn by name (:func:`draw_leaf`) from :func:`leaf_seed`
    of its path, so two models sharing a parameter path (and ``base_seed``) share its value. One leaf at a time:
    the peak is the arrays made so far plus one leaf's temporaries.
    """
    from flax import nnx

    graphdef, state = nnx.split(abstract_module)
    pure = nnx.to_pure_dict(state)
    for kp, name, leaf in _paths(pure):
        value = overrides(name, leaf) if overrides is not None else None
        if value is None:
            value = draw_leaf(
                leaf_seed(base_seed, name), tuple(leaf.shape), np.dtype(leaf.dtype), _leaf_kind(name, leaf.dtype)
            )
        if tuple(value.shape) != tuple(leaf.shape) or np.dtype(value.dtype) != np.dtype(leaf.dtype):
            raise ValueError(
                f"fill_random: {name}: made {value.dtype}{list(value.shape)}, the model expects "
                f"{leaf.dtype}{list(leaf.shape)}"
            )
        _set_path(pure, kp, value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def block_linear_of(name: str) -> str | None:
    """The ``BLOCK_LINEARS`` path a dotted leaf name belongs to (``blocks.ffn.fc1.kernel`` -> ``blocks.ffn.fc1``)."""
    from wanjax.model.names import BLOCK_LINEARS

    head = name.rsplit(".", 1)[0]
    return head if head in BLOCK_LINEARS else None


def random_bf16_expert(cfg, seed: int = 0, dtype=None):
    """Full expert ``WanDiT(cfg)`` with random weights (bf16 storage; fp32 where the model keeps fp32)."""
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.model.dit import WanDiT

    dtype = dtype or jnp.bfloat16
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))

    def block_kernels(name, leaf):
        if name.endswith(".kernel") and block_linear_of(name):
            num_layers, k, n = leaf.shape
            return stacked_kernel_fn(num_layers, k, n, np.dtype(leaf.dtype))(np.uint32(leaf_seed(seed, name)))
        return None

    return fill_random(abstract, seed, block_kernels)


def random_array(seed: int, shape: tuple, dtype):
    """Unit-variance random array made on the device (:func:`hash_normalish`)."""
    return _random_array_fn(tuple(shape), np.dtype(dtype))(np.uint32(seed))


@functools.lru_cache(maxsize=None)
def _random_array_fn(shape, dtype):
    import jax

    return jax.jit(lambda seed: hash_normalish(seed, shape).astype(dtype))
