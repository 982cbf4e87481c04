"""kernels/act_quant_gpu.act_quant_lowrank_pallas: the one-kernel activation quantization (codes, scales and the
rank-r down projection in one Pallas Triton kernel), run in the Pallas interpreter against the XLA/reference path.

Triton lowering needs a GPU to compile, so this kernel is not lowered on CPU; it ran on the H200 (bench.act_quant).
"""

import numpy as np
import pytest
import jax.numpy as jnp

from kernel_inputs import act_inputs

from wanjax.kernels import dispatch
from wanjax.kernels import reference as ref
from wanjax.kernels.act_quant_gpu import act_quant_fused, act_quant_lowrank_pallas, fused_supports, padded_rank


_inputs = act_inputs


@pytest.mark.parametrize(
    "m,k,r,static,bm",
    [
        (37, 512, 32, None, 16),
        (16, 13824, 16, None, 16),
        (21, 384, 0, 0.3, 16),
        (40, 640, 64, None, 32),
        (70, 5120, 32, None, 64),
        (33, 256, 96, None, 16),  # rank 32 + a rank-64 LoRA: down zero-padded to 128 columns, x_lr sliced back
        (20, 256, 8, None, 16),
    ],
)
def test_fused_kernel_interpreter_matches_reference(m, k, r, static, bm):
    """M not a multiple of the 16-row block (the last block is shifted back), K = 13824 / 5120 / odd chunkings,
    r in {0, 16, 32, 64}: codes identical, scales within an ulp, x_lr within bf16 rounding of the folded XLA GEMM."""
    x, smooth, down = _inputs(m, k, r, m * k + r)
    q, s, lr = act_quant_lowrank_pallas(x, smooth, down, 0.9, static, block_rows=bm, interpret=True)
    q0, s0 = ref.quantize_act_int4(x, smooth, 0.9, static)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q0))
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=3e-7)
    if r == 0:
        assert lr is None
        return
    assert lr.shape == (m, r)
    _, _, lr0 = act_quant_fused(x, smooth, down, 0.9, static, fold_smooth=True)
    lr, lr0, lr_ref = (np.asarray(a, np.float32) for a in (lr, lr0, ref.lowrank_down(x, down, smooth)))
    assert np.linalg.norm(lr - lr0) <= 1e-2 * np.linalg.norm(lr0)
    assert np.linalg.norm(lr - lr_ref) <= 1e-2 * np.linalg.norm(lr_ref)


def test_fused_kernel_zero_rows_and_no_smooth():
    x = jnp.zeros((64, 256), jnp.bfloat16).at[1, 5].set(3.0)
    q, s, _ = act_quant_lowrank_pallas(x, None, None, 1.0, None, interpret=True)
    assert np.asarray(s)[0] == 1.0 and np.asarray(q)[0].tolist() == [0] * 256  # all-zero row: scale 1, codes 0
    assert np.asarray(q)[1, 5] == 7 and np.isclose(np.asarray(s)[1], 3.0 / 7)


def test_fused_supports_and_errors():
    assert fused_supports(32760, 5120, 32) and fused_supports(32760, 13824, 0)
    assert not fused_supports(63, 5120, 32)  # fewer rows than one block (64 by default)
    assert fused_supports(16, 5120, 32, block_rows=16)
    assert fused_supports(64, 5120, 24)  # r not a power of two: padded to 32 inside (exact)
    assert [padded_rank(r) for r in (0, 8, 16, 24, 32, 96, 128)] == [0, 16, 16, 32, 32, 128, 128]
    assert not fused_supports(64, 100, 16)  # no power-of-two chunk >= 64 divides K
    x, smooth, down = _inputs(8, 256, 16, 0)
    with pytest.raises(ValueError, match="unsupported shape M=8"):
        act_quant_lowrank_pallas(x, smooth, down, interpret=True)


def test_fused_stages_fit_shared_memory():
    """The pipeline depth is capped so the stages fit Hopper's shared memory: the tuned 3 stages stay for ranks up to
    64 at 256-column chunks, rank 96 / 128 (rank 32 + a rank-64 LoRA; 3 stages asked for 263,168 bytes on an H100 and
    failed) gets 2, and the rotation's larger blocks keep what fitted there (512: 2 stages, 1024: 1)."""
    from wanjax.kernels.act_quant_gpu import FUSED_CHUNK, FUSED_STAGES, max_fused_stages

    assert min(FUSED_STAGES, max_fused_stages(64, FUSED_CHUNK, 32)) == 3
    assert min(FUSED_STAGES, max_fused_stages(64, FUSED_CHUNK, 64)) == 3
    assert max_fused_stages(64, FUSED_CHUNK, padded_rank(96)) == 2
    assert max_fused_stages(64, 512, 32) == 2 and max_fused_stages(64, 1024, 32) == 1
    assert max_fused_stages(64, 4096, 256) == 1  # never 0


def test_dispatch_routes_fused_impl(monkeypatch):
    """act_quant_impl='fused' runs the one-kernel path (here through its interpreter) where it supports the shape,
    and falls back to the XLA function where it does not."""
    from wanjax.kernels import act_quant_gpu

    calls = []
    orig = act_quant_gpu.act_quant_lowrank_pallas

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return orig(*a, **{**kw, "interpret": True})

    monkeypatch.setattr(act_quant_gpu, "act_quant_lowrank_pallas", spy)
    monkeypatch.setattr(dispatch, "_platform", lambda: "gpu")
    monkeypatch.setattr(
        dispatch, "FUSED_ACT_QUANT_MIN_M", 64
    )  # the real threshold (16384 rows) is too big to interpret
    x, smooth, down = _inputs(70, 256, 16, 1)
    q, s, _ = dispatch.act_quant(x, smooth, down, 0.9, backend="pallas")  # "fused" is the default impl
    assert calls == [(70, 256)]
    q0, s0 = ref.quantize_act_int4(x, smooth, 0.9)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q0))
    x, smooth, down = _inputs(5, 256, 16, 2)  # M < one block: XLA fallback
    q, _, _ = dispatch.act_quant(x, smooth, down, 0.9, backend="pallas", act_quant_impl="fused")
    assert calls == [(70, 256)]
    np.testing.assert_array_equal(np.asarray(q), np.asarray(ref.quantize_act_int4(x, smooth, 0.9)[0]))
    monkeypatch.setattr(dispatch, "FUSED_ACT_QUANT_MIN_M", 128)  # below the row threshold: XLA as well
    x, smooth, down = _inputs(70, 256, 16, 3)
    q, _, _ = dispatch.act_quant(x, smooth, down, 0.9, backend="pallas")
    assert calls == [(70, 256)]
    np.testing.assert_array_equal(np.asarray(q), np.asarray(ref.quantize_act_int4(x, smooth, 0.9)[0]))


def test_fused_kernel_l2_hint_same_numbers():
    x, smooth, down = _inputs(33, 1024, 32, 9)
    a = act_quant_lowrank_pallas(x, smooth, down, 0.9, None, block_rows=32, chunk=256, interpret=True)
    b = act_quant_lowrank_pallas(x, smooth, down, 0.9, None, block_rows=32, chunk=256, l2_hint=True, interpret=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))


def test_fused_not_used_off_gpu(monkeypatch):
    """On CPU (and TPU) the default impl runs the XLA function even with backend='pallas'."""
    from wanjax.kernels import act_quant_gpu

    def boom(*a, **kw):
        raise AssertionError("the Triton kernel must not run off GPU")

    monkeypatch.setattr(act_quant_gpu, "act_quant_lowrank_pallas", boom)
    x, smooth, down = _inputs(70, 256, 16, 4)
    q, _, _ = dispatch.act_quant(x, smooth, down, 0.9, backend="pallas")
    np.testing.assert_array_equal(np.asarray(q), np.asarray(ref.quantize_act_int4(x, smooth, 0.9)[0]))


@pytest.mark.parametrize("programs,reverse", [(2, False), (3, True), (50, True)])
def test_fused_kernel_persistent_grid_and_reverse_same_numbers(programs, reverse):
    """A persistent grid (fewer programs than row blocks, the last one redone by trailing iterations; or more
    programs than blocks) and pass 2 walked backwards give the default kernel's numbers."""
    x, smooth, down = _inputs(70, 512, 16, 11)
    a = act_quant_lowrank_pallas(x, smooth, down, 0.9, None, block_rows=16, chunk=128, interpret=True)
    b = act_quant_lowrank_pallas(
        x, smooth, down, 0.9, None, block_rows=16, chunk=128, programs=programs, reverse=reverse, interpret=True
    )
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32))


@pytest.mark.parametrize(
    "opts",
    [
        {"fast": True},
        {"fast": True, "int_round": True},
        {"fast": True, "lazy_max": True},
        {"fast": True, "int_round": True, "lazy_max": True},
    ],
)
@pytest.mark.parametrize("clip,static", [(0.9, None), (0.5, None), (1.0, 0.05)])
def test_fast_variants_match_reference(opts, clip, static):
    """The reduced-instruction variants (reciprocal multiplies, rounding by 1.5 * 2**23 in the float or the integer
    domain, element-wise running max) give the reference's codes and scales on these inputs, including a clip < 1
    (codes saturate at +-7) and a static scale; exact rounding ties go to the even code."""
    x, smooth, down = _inputs(37, 512, 16, 21)
    q, s, lr = act_quant_lowrank_pallas(x, smooth, down, clip, static, block_rows=16, chunk=128, interpret=True, **opts)
    q0, s0 = ref.quantize_act_int4(x, smooth, clip, static)
    assert np.mean(np.asarray(q) != np.asarray(q0)) <= 1e-4  # reciprocal multiply: an ulp away from the division
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=3e-7)
    if clip < 1:
        assert np.abs(np.asarray(q)).max() == 7
    ties = jnp.asarray([[2.5, -2.5, 3.5, 0.5, -0.5, 7.0, 9.0, -1.5] + [0.0] * 120] * 16, jnp.float32)
    q, _, _ = act_quant_lowrank_pallas(ties, None, None, 1.0, 1.0, block_rows=16, chunk=128, interpret=True, **opts)
    assert np.asarray(q)[0, :8].tolist() == [2, -2, 4, 0, 0, 7, 7, -2]


@pytest.mark.parametrize("opts", [{}, {"fast": True, "int_round": True}])
def test_no_smooth_skips_the_multiply_and_matches_reference(opts):
    """smooth=None (smoothing folded into the producer of x): the kernel's codes, scales and projection equal the
    reference without smoothing, at an odd M with the last block shifted back."""
    x, _, down = _inputs(45, 512, 32, 31)
    q, s, lr = act_quant_lowrank_pallas(x, None, down, 0.8, None, block_rows=16, chunk=128, interpret=True, **opts)
    q0, s0 = ref.quantize_act_int4(x, None, 0.8)
    assert np.mean(np.asarray(q) != np.asarray(q0)) <= 1e-4
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=3e-7)
    np.testing.assert_allclose(
        np.asarray(lr, np.float32), np.asarray(ref.lowrank_down(x, down, None), np.float32), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize(
    "m,k,r,chunk,opts",
    [
        (70, 512, 32, 256, {}),
        (37, 384, 16, 128, {}),
        (64, 256, 0, 64, {}),
        (40, 1024, 16, 512, {"fast": True, "int_round": True}),
        (33, 2048, 0, 1024, {"fast": True, "int_round": True}),
    ],
)
def test_fused_kernel_rotation_matches_the_f32_rotation(m, k, r, chunk, opts):
    """In-kernel rotation (``rot_signs``): the input rotated with Hadamard blocks of ``chunk`` after the smoothing
    (blocks over 128 as butterflies across pieces of 128). In the interpreter, codes and scales are those of
    ``numerics.hadamard.rotate_activations_mxu`` (the run-time rotation of the XLA paths) exactly; against the f32 transform
    ``rotate_activations`` the codes differ by one where bf16 rounding moves a value across a rounding boundary (a few
    in 1e3), scales and x_lr within bf16 rounding."""
    from wanjax.numerics.hadamard import random_signs, rotate_activations, rotate_activations_mxu
    import jax

    x, smooth, down = _inputs(m, k, max(r, 16), m * k + r)
    down = down if r else None
    signs = random_signs(jax.random.key(3), k)
    q, s, lr = act_quant_lowrank_pallas(
        x, smooth, down, 0.9, None, block_rows=16, chunk=chunk, rot_signs=signs, interpret=True, **opts
    )
    xm = rotate_activations_mxu(x.astype(jnp.float32) / smooth, signs, chunk)
    qm, sm = ref.quantize_act_int4(xm, None, 0.9)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(qm))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(sm))
    xr = rotate_activations(x.astype(jnp.float32) / smooth, signs, chunk)
    q0, s0 = ref.quantize_act_int4(xr, None, 0.9)
    q, q0 = np.asarray(q, np.int32), np.asarray(q0, np.int32)
    assert np.abs(q - q0).max() <= 1 and 0 < np.mean(q != q0) < 5e-3
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=1e-2)
    if r:
        lrm = np.asarray(ref.lowrank_down(xm, down, None), np.float32)
        assert np.linalg.norm(np.asarray(lr, np.float32) - lrm) <= 1e-2 * np.linalg.norm(lrm)
        lr0 = np.asarray(ref.lowrank_down(xr, down, None), np.float32)
        assert np.linalg.norm(np.asarray(lr, np.float32) - lr0) <= 1e-2 * np.linalg.norm(lr0)
    else:
        assert lr is None
    with pytest.raises(ValueError, match="Hadamard block"):
        act_quant_lowrank_pallas(x, smooth, None, block_rows=16, rot_signs=signs, chunk=2 * k, interpret=True)


def test_dispatch_rotates_in_the_kernel_where_the_block_fits(monkeypatch):
    """``rot_signs`` on the GPU path: blocks of 64-512 go into the kernel (chunk = block, signs passed); blocks of 32
    and 1024 (slower in the kernel on the H100) are rotated by the XLA pass first and the kernel quantizes its
    output unrotated."""
    from wanjax.kernels import act_quant_gpu
    from wanjax.numerics.hadamard import random_signs, rotate_activations
    import jax

    calls = []
    orig = act_quant_gpu.act_quant_lowrank_pallas

    def spy(*a, **kw):
        calls.append((kw.get("rot_signs") is not None, kw.get("chunk")))
        return orig(*a, **{**kw, "interpret": True})

    monkeypatch.setattr(act_quant_gpu, "act_quant_lowrank_pallas", spy)
    monkeypatch.setattr(dispatch, "_platform", lambda: "gpu")
    monkeypatch.setattr(dispatch, "FUSED_ACT_QUANT_MIN_M", 64)
    monkeypatch.setattr(dispatch, "FUSED_ROT_ACT_QUANT_MIN_M", 64)
    x, smooth, down = _inputs(70, 1024, 16, 5)
    signs = random_signs(jax.random.key(2), 1024)
    cases = [(None, (False, None)), (512, (True, 512)), (128, (True, 128)), (32, (False, None))]
    for block, expect in cases + [("rot_threshold", (False, None))]:
        if block == "rot_threshold":  # fewer rows than the rotation's own threshold: XLA rotation, unrotated kernel
            monkeypatch.setattr(dispatch, "FUSED_ROT_ACT_QUANT_MIN_M", 128)
            block = 256
        q, _, _ = dispatch.act_quant(x, smooth, down, 0.9, rot_signs=signs, rot_block=block, backend="pallas")
        assert calls[-1] == expect
        q0, _ = ref.quantize_act_int4(rotate_activations(x.astype(jnp.float32) / smooth, signs, block), None, 0.9)
        q, q0 = np.asarray(q, np.int32), np.asarray(q0, np.int32)
        assert np.abs(q - q0).max() <= 1 and np.mean(q != q0) < 5e-3


@pytest.mark.parametrize("block", [None, 256, 512, 1024])
def test_fused_kernel_lowers_to_triton_for_an_h100(block):
    """The Pallas -> Triton lowering of the fused kernel (unrotated, and rotating in blocks of 256-1024 as butterflies
    over 128-column pieces, with the dispatcher's ``rotation_options``) at the Wan shape, for an abstract H100 on
    CPU: catches lowering errors without a GPU (Triton's own compilation, shared-memory limits included, runs only on
    the device)."""
    import jax
    from wanjax.kernels.act_quant_gpu import FUSED_OPTIONS, rotation_options

    m, k, r = 32760, 5120, 32
    args = [
        jax.ShapeDtypeStruct(s, d)
        for s, d in (((m, k), jnp.bfloat16), ((k,), jnp.float32), ((k, r), jnp.bfloat16), ((k,), jnp.float32))
    ]
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)

    def f(x, sm, dn, sg):
        return act_quant_lowrank_pallas(
            x,
            sm,
            dn,
            1.0,
            None,
            chunk=block or 256,
            rot_signs=None if block is None else sg,
            **(FUSED_OPTIONS if block is None else rotation_options(block)),
        )

    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text.lower()
