"""The INT4 W4A4 linear below the routing: operand checks and one function per implementation of the GEMM.

``kernels.dispatch.w4a4_matmul`` / ``w4a4_linear`` choose among these (backend, platform, shape, M):

* :func:`reference_matmul` / :func:`grouped_reference_matmul` - ``kernels.reference`` (int32-upcast dot);
* :func:`gpu_matmul` - the Mosaic GPU GEMM (``kernels.w4a4_gpu``), on packed weights unpacked in registers
  (``weights="int4"``) or on int8 weights (``"int8"``, packed codes unpacked by one XLA pass first);
* :func:`g128_gpu_matmul` - the group-scaled (g128) Mosaic GPU GEMM (``kernels.w4a4_g128_gpu``);
* :func:`tpu_matmul` - the Pallas TPU GEMM (``kernels.w4a4_tpu``);
* the XLA paths are in ``kernels.xla_paths``.

The kernel modules are imported when first called (they pull in Pallas Mosaic GPU / TPU).
"""

from __future__ import annotations

import jax.numpy as jnp

from . import reference
from .xla_paths import int8_weights

__all__ = [
    "check_linear_input",
    "g128_gpu_matmul",
    "gpu_matmul",
    "group_of",
    "grouped_reference_matmul",
    "reference_matmul",
    "tpu_matmul",
    "weights_nk",
]


def weights_nk(w) -> tuple[int, int]:
    """(N, K) of W4A4 weights: packed uint8 [N, K/2] or int8 [N, K] (int4 values); ``ValueError`` otherwise."""
    if w.ndim != 2 or w.dtype not in (jnp.uint8, jnp.int8):
        raise ValueError(
            f"W4A4 weights must be packed uint8 [N, K/2] or int8 [N, K] (int4 values), got {w.dtype} {w.shape}"
        )
    return w.shape[0], w.shape[1] * (2 if w.dtype == jnp.uint8 else 1)


def group_of(s_w, n: int, k: int, group_size: int | None) -> int | None:
    """The weight-scale group along K (None = per channel), checked against the shape of ``s_w``."""
    if group_size is None or group_size == k:
        if s_w.shape not in ((n,), (n, 1)):
            raise ValueError(f"W4A4 per-channel scales must be [N={n}] (or pass group_size), got {s_w.shape}")
        return None
    if k % group_size or s_w.shape != (n, k // group_size):
        raise ValueError(
            f"W4A4 group_size={group_size}: K={k} must be a multiple of it and s_w [N={n}, "
            f"{k // group_size if group_size else '?'}], got s_w {s_w.shape}"
        )
    return group_size


def check_linear_input(x, w_packed) -> None:
    """``x [..., K]`` must match the weights' K."""
    k = x.shape[-1]
    if weights_nk(w_packed)[1] != k:
        raise ValueError(
            f"w4a4_linear: w_packed must be uint8 [N, K/2={k // 2}] or int8 [N, K={k}], got "
            f"{w_packed.dtype} {w_packed.shape}"
        )


def reference_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype):
    """Per-channel W4A4 GEMM by the int32-upcast reference."""
    return reference.w4a4_epilogue(
        reference.int_matmul_nt(q_x, int8_weights(w_packed)), s_x, s_w, x_lr, up, bias, out_dtype
    )


def grouped_reference_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, group_size):
    """Group-scaled W4A4 GEMM by the int32-upcast reference."""
    return reference.w4a4_g128_reference(
        q_x, s_x, int8_weights(w_packed), s_w, x_lr, up, bias, out_dtype, group_size=group_size
    )


def gpu_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, *, in_registers: bool):
    """The Mosaic GPU GEMM: ``in_registers`` keeps packed weights packed (int4 unpacked in registers inside the
    kernel), else the weights are unpacked to int8 first (one XLA pass over the weights) for the faster
    int8-operand kernel."""
    from .w4a4_gpu import w4a4_matmul_gpu_any_m

    if in_registers:
        return w4a4_matmul_gpu_any_m(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype=out_dtype, weights="int4")
    return w4a4_matmul_gpu_any_m(
        q_x, s_x, int8_weights(w_packed), s_w, x_lr, up, bias, out_dtype=out_dtype, weights="int8"
    )


def g128_gpu_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype):
    """The group-scaled (g128) Mosaic GPU GEMM on int8 weights (packed codes unpacked by one XLA pass)."""
    from .w4a4_g128_gpu import w4a4_g128_matmul_gpu_any_m

    return w4a4_g128_matmul_gpu_any_m(q_x, s_x, int8_weights(w_packed), s_w, x_lr, up, bias, out_dtype=out_dtype)


def tpu_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, *, mode: str):
    """The Pallas TPU GEMM in ``mode`` ("fp8": int4 values in int8, converted in VMEM; else the weights as given)."""
    from .w4a4_tpu import w4a4_matmul_tpu

    w = int8_weights(w_packed) if mode == "fp8" else w_packed  # fp8: int4 values in int8, converted in VMEM
    return w4a4_matmul_tpu(q_x, s_x, w, s_w, x_lr, up, bias, out_dtype=out_dtype, mode=mode)
