"""Nibble packing: exact byte layout, round trips, agreement with jnp.int4 bits and kernels.reference, pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.numerics import formats as F


def test_hand_written_byte_layout():
    # byte j = code[2j] in the low nibble | code[2j+1] in the high nibble.
    signed = jnp.asarray([[1, -1, 7, -8, 0, 3]], jnp.int8)
    np.testing.assert_array_equal(np.asarray(F.pack_nibbles(signed)), [[0xF1, 0x87, 0x30]])
    fp4 = jnp.asarray([[0x2, 0xA, 0xF, 0x0], [0x7, 0x8, 0x1, 0x9]], jnp.uint8)
    np.testing.assert_array_equal(np.asarray(F.pack_nibbles(fp4)), [[0xA2, 0x0F], [0x87, 0x91]])
    np.testing.assert_array_equal(
        np.asarray(F.unpack_nibbles(jnp.asarray([[0xF1, 0x87, 0x30]], jnp.uint8), True)), [[1, -1, 7, -8, 0, 3]]
    )
    np.testing.assert_array_equal(
        np.asarray(F.unpack_nibbles(jnp.asarray([[0xA2, 0x0F]], jnp.uint8), False)), [[0x2, 0xA, 0xF, 0x0]]
    )


def test_all_256_bytes_round_trip_signed_and_unsigned():
    b = jnp.arange(256, dtype=jnp.uint8).reshape(4, 64)
    for signed in (True, False):
        codes = F.unpack_nibbles(b, signed)
        assert codes.shape == (4, 128) and codes.dtype == (jnp.int8 if signed else jnp.uint8)
        c = np.asarray(codes).astype(np.int64)
        assert (c.min(), c.max()) == ((-8, 7) if signed else (0, 15))
        np.testing.assert_array_equal(np.asarray(F.pack_nibbles(codes)), np.asarray(b))


def test_same_bits_as_little_endian_jnp_int4():
    codes = np.random.RandomState(0).randint(-8, 8, (5, 64)).astype(np.int8)
    as_int4 = jnp.asarray(codes, jnp.int4).reshape(5, 32, 2)
    np.testing.assert_array_equal(
        np.asarray(jax.lax.bitcast_convert_type(as_int4, jnp.uint8)), np.asarray(F.pack_nibbles(jnp.asarray(codes)))
    )


def test_matches_kernels_reference_packing():
    ref = pytest.importorskip("wanjax.kernels.reference")
    if not hasattr(ref, "pack_int4"):
        pytest.skip("kernels.reference has no pack_int4")
    codes = jnp.asarray(np.random.RandomState(1).randint(-8, 8, (3, 4, 32)).astype(np.int8))
    np.testing.assert_array_equal(np.asarray(ref.pack_int4(codes)), np.asarray(F.pack_nibbles(codes)))
    np.testing.assert_array_equal(np.asarray(ref.unpack_int4(F.pack_nibbles(codes))), np.asarray(codes))


def test_pack_errors():
    with pytest.raises(ValueError, match=r"K even, got shape \(2, 5\)"):
        F.pack_nibbles(jnp.zeros((2, 5), jnp.int8))
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\], got min -9"):
        F.pack_nibbles(jnp.asarray([[-9, 0]], jnp.int8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 15\], got min 0 max 16"):
        F.pack_nibbles(jnp.asarray([[16, 0]], jnp.uint8))
    with pytest.raises(ValueError, match="integer dtype"):
        F.pack_nibbles(jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        F.unpack_nibbles(jnp.zeros((2, 4), jnp.int8), True)


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 32}), ("int4", {}), ("mxfp4", {}), ("nvfp4", {})])
def test_quantized_tensor_pack_unpack_and_dequantize(fmt, kw):
    x = jnp.asarray(np.random.RandomState(2).randn(2, 3, 64).astype(np.float32))
    q = F.quantize(x, fmt, **kw)
    p = q.pack()
    assert p.packed and p.codes.shape == (2, 3, 32) and p.codes.dtype == jnp.uint8 and p.shape == (2, 3, 64)
    assert p.pack() is p and q.unpack() is q
    u = p.unpack()
    np.testing.assert_array_equal(np.asarray(u.codes), np.asarray(q.codes))
    assert u.codes.dtype == q.codes.dtype
    np.testing.assert_array_equal(np.asarray(F.dequantize(p)), np.asarray(F.dequantize(q)))
    np.testing.assert_array_equal(np.asarray(jax.jit(F.dequantize)(p)), np.asarray(q.dequantize()))


def test_pack_rejects_8bit_formats():
    with pytest.raises(ValueError, match="only 4-bit formats"):
        F.quantize_int8(jnp.ones((2, 4))).pack()


def test_quantized_tensor_is_a_pytree_with_static_metadata():
    q = F.quantize_nvfp4(jnp.ones((2, 32))).pack()
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3  # codes, scales, tensor_scale
    q2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (q2.fmt, q2.group_size, q2.packed) == ("nvfp4", 16, True)
    # Static fields take part in the treedef: a different group size is a different structure.
    other = jax.tree_util.tree_structure(F.quantize_int4(jnp.ones((2, 64)), group_size=32))
    assert other != jax.tree_util.tree_structure(F.quantize_int4(jnp.ones((2, 64))))
    # Works through jit boundaries and tree_map.
    out = jax.jit(lambda q: q)(q)
    assert isinstance(out, F.QuantizedTensor) and out.packed
    doubled = jax.tree_util.tree_map(lambda a: a, q)
    assert doubled.fmt == "nvfp4"


def test_vmap_over_a_leading_axis_equals_direct_call():
    x = jnp.asarray(np.random.RandomState(3).randn(3, 4, 64).astype(np.float32))
    for fmt in ("int4", "mxfp4"):
        qv = jax.vmap(lambda r: F.quantize(r, fmt))(x)
        qd = F.quantize(x, fmt)
        np.testing.assert_array_equal(np.asarray(qv.codes), np.asarray(qd.codes))
        np.testing.assert_array_equal(np.asarray(qv.scales), np.asarray(qd.scales))
        np.testing.assert_array_equal(np.asarray(jax.vmap(F.dequantize)(qv)), np.asarray(F.dequantize(qd)))
