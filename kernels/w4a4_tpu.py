"""W4A4 GEMM for TPU in Pallas (Mosaic TPU): integer MXU product with the W4A4 epilogue.

Computes the same function as ``kernels.reference.w4a4_matmul``::

    out = (q_x @ q_w^T)(int32) * s_x[m] * s_w[n] + bias[n] + x_lr @ up

Blocked (M/bm, N/bn, K/bk) grid; an int32 VMEM accumulator is zeroed at the first K step and the f32 epilogue (scales,
bias, the rank-r bf16 product) runs at the last one. Operands:

* ``mode="int8"``: int8 activations x int8 weights (int4 values) -> int32 (the int8 MXU mode of v5e/v5p/v6e, 2x bf16);
* ``mode="int4"``: weights given as ``jnp.int4`` (or packed uint8) and converted to int8 inside the kernel (the
  recipe tested by jax: load int4, ``astype(int8)``, int8 dot); weights stay packed in HBM;
* ``mode="native_int4"``: activations and weights both ``jnp.int4`` and one int4 x int4 -> int32 dot (the native int4
  MXU mode of v5e/v5p/v6e, 4x bf16). Lowers for TPU; XLA:CPU cannot run int4 dots, so the interpreter cannot check it.

* ``mode="fp8"``: both operands as float8_e4m3fn, one e4m3 x e4m3 -> f32 dot (for TPU7x, whose MXU has FP8 but no
  integer modes). int8 operands holding int4 values are converted in VMEM (every value in [-8, 7] is exact in e4m3);
  e4m3 operands are taken as they are, e.g. MXFP4 rows re-encoded by ``mxfp4_gpu.prepare_weights`` /
  ``act_to_fp8`` with their power-of-two row scales as ``s_x`` / ``s_w``. The accumulator is f32: for int4 values
  every product is an integer of at most 64 and every partial sum stays below 2**24 for K < 262,144, so the
  accumulation is exact, the same numbers as the int32 modes.

Status: verified in the Pallas interpreter on CPU (``interpret=True``) against the reference and lowered for the
"tpu" platform on CPU; **never run on a real TPU** (none was available).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
from jax.experimental.pallas import tpu as pltpu

NT = (((1,), (1,)), ((), ()))
MODES = ("int8", "int4", "native_int4", "fp8")


@dataclasses.dataclass(frozen=True)
class TPUConfig:
    """Block sizes (qwix's TPU v5 sweep used bm=256, bk=512, bn=1024 for int8 matmuls)."""

    bm: int = 256
    bn: int = 1024
    bk: int = 512


def auto_config(m: int, n: int, k: int) -> TPUConfig:
    """Largest default-like blocks that divide N and K (bm may leave a partial last block)."""
    bn = next((b for b in (1024, 512, 256, 128) if n % b == 0), n)
    bk = next((b for b in (512, 1024, 256, 128) if k % b == 0), k)
    return TPUConfig(bm=min(256, m), bn=bn, bk=bk)


def _kernel(*refs, nk, r, has_bias, mode):
    x_ref, w_ref, sx_ref, sw_ref = refs[:4]
    rest = list(refs[4:])
    b_ref = rest.pop(0) if has_bias else None
    xlr_ref = rest.pop(0) if r else None
    up_ref = rest.pop(0) if r else None
    o_ref, acc_ref = rest
    kk = pl.program_id(2)

    acc_dtype = jnp.float32 if mode == "fp8" else jnp.int32

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_dtype)

    x = x_ref[...]
    w = w_ref[...]
    if mode == "int4":
        w = w.astype(jnp.int8)
    elif mode == "fp8":  # int4 values held in int8 are exact in e4m3; e4m3 operands pass through
        x = x.astype(jnp.float8_e4m3fn)
        w = w.astype(jnp.float8_e4m3fn)
    acc_ref[...] += lax.dot_general(x, w, NT, preferred_element_type=acc_dtype)

    @pl.when(kk == nk - 1)
    def _epilogue():
        y = acc_ref[...].astype(jnp.float32) * sx_ref[...] * sw_ref[...]
        if has_bias:
            y = y + b_ref[...]
        if r:
            y = y + lax.dot_general(
                xlr_ref[...], up_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
        o_ref[...] = y.astype(o_ref.dtype)


def w4a4_matmul_tpu(
    q_x,
    s_x,
    w,
    s_w,
    x_lr=None,
    up=None,
    bias=None,
    *,
    out_dtype=jnp.bfloat16,
    mode="int8",
    config: TPUConfig | None = None,
    interpret=False,
):
    """Pallas TPU W4A4 GEMM.

    Args:
      q_x: int8 [M, K] (int4 values), or float8_e4m3fn [M, K] ("fp8" only); any M (the last M block is partial).
      s_x: f32 [M]; w: int8 [N, K] ("int8"), packed uint8 [N, K/2] / ``jnp.int4`` [N, K] ("int4", "native_int4"),
        int8 (int4 values) or float8_e4m3fn [N, K] ("fp8");
      s_w: f32 [N]; x_lr, up: optional bf16 [M, r], [r, N]; bias: optional f32 [N].
      mode: "int8" | "int4" | "native_int4" | "fp8" (see module docstring).
      config: block sizes; N must be a multiple of bn and K of bk (blocks shrink to N or K when those are smaller);
        None = :func:`auto_config`.
      interpret: run in the Pallas interpreter (CPU).
    """
    if mode not in MODES:
        raise ValueError(f"w4a4_matmul_tpu: mode must be one of {MODES}, got {mode!r}")
    if mode in ("int4", "native_int4") and w.dtype == jnp.uint8:
        from wanjax.numerics.pack import packed_as_int4

        w = packed_as_int4(w)
    fp8_ok = (jnp.int8, jnp.float8_e4m3fn)
    want = {"int8": (jnp.int8,), "fp8": fp8_ok}.get(mode, (jnp.int4,))
    if w.dtype not in want:
        raise ValueError(
            f"w4a4_matmul_tpu(mode={mode!r}): weights must be {' or '.join(jnp.dtype(d).name for d in want)}"
            f", got {w.dtype}"
        )
    if q_x.dtype not in (fp8_ok if mode == "fp8" else (jnp.int8,)):
        raise ValueError(
            f"w4a4_matmul_tpu(mode={mode!r}): q_x must be int8{' or float8_e4m3fn' if mode == 'fp8' else ''}"
            f", got {q_x.dtype}"
        )
    m, k = q_x.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"w4a4_matmul_tpu: weights [N, K] must match q_x [M, K]: {q_x.shape} vs {w.shape}")
    if x_lr is not None and x_lr.shape[1] == 0:
        x_lr = up = None
    r = 0 if x_lr is None else x_lr.shape[1]
    config = config or auto_config(m, n, k)
    bm, bn, bk = min(config.bm, m), min(config.bn, n), min(config.bk, k)
    if n % bn or k % bk:
        raise ValueError(f"w4a4_matmul_tpu: N={n} and K={k} must be multiples of bn={bn} and bk={bk}")
    if mode == "native_int4":
        q_x = q_x.astype(jnp.int4)
    nk = k // bk
    in_specs = [
        pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
        pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
        pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
        pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
    ]
    args = [q_x, w, s_x.astype(jnp.float32)[:, None], s_w.astype(jnp.float32)[None, :]]
    if bias is not None:
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)))
        args.append(bias.astype(jnp.float32)[None, :])
    if r:
        in_specs += [pl.BlockSpec((bm, r), lambda i, j, kk: (i, 0)), pl.BlockSpec((r, bn), lambda i, j, kk: (0, j))]
        args += [x_lr.astype(jnp.bfloat16), up.astype(jnp.bfloat16)]
    kern = functools.partial(_kernel, nk=nk, r=r, has_bias=bias is not None, mode=mode)
    return pl.pallas_call(
        kern,
        grid=(pl.cdiv(m, bm), n // bn, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32 if mode == "fp8" else jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*args)
