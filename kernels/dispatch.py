"""Backend selection for the W4A4 linear: the only entry point ``wanjax.quant`` should call.

Backends:

* ``"pallas"``: Mosaic GPU kernels (Hopper: H100/H200): fused act quant + int8-``wgmma`` W4A4 GEMM with the fused
  scale/bias/low-rank epilogue. Needs N % 256 == 0 and K % 128 == 0 (all Wan2.2 linears); other shapes use "xla".
  On a TPU it selects the Pallas TPU kernel (``w4a4_tpu``; verified only in the interpreter, never on a TPU, hence
  not the TPU default).
* ``"xla"``: the same math with XLA ops: int8 x int8 -> int32 ``dot_general`` (cuBLASLt IMMA on GPU, int8 MXU on
  TPU), epilogue in f32. Fast everywhere, exact integer accumulation.
* ``"reference"``: ``kernels.reference`` (int32-upcast dot; the ground truth, slow on accelerators).

Default: "pallas" on a CUDA GPU of compute capability 9.x, else "xla". Override with the environment variable
``WANJAX_KERNELS=reference|xla|pallas`` or the ``backend=`` argument.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax

from . import reference
from .act_quant_gpu import act_quant_fused, act_quant_pallas

BACKENDS = ("reference", "xla", "pallas")
ENV_VAR = "WANJAX_KERNELS"


def _platform() -> str:
  try:
    return jax.devices()[0].platform
  except RuntimeError:  # pragma: no cover
    return "cpu"


def _is_hopper() -> bool:
  try:
    dev = jax.devices()[0]
  except RuntimeError:  # pragma: no cover
    return False
  if dev.platform != "gpu":
    return False
  cc = getattr(dev, "compute_capability", "")
  return str(cc).startswith("9")


def select_backend(backend: str | None = None) -> str:
  """The backend to use: explicit argument > $WANJAX_KERNELS > platform default."""
  choice = backend or os.environ.get(ENV_VAR) or None
  if choice is None:
    return "pallas" if _is_hopper() else "xla"
  if choice not in BACKENDS:
    raise ValueError(f"kernel backend must be one of {BACKENDS} (argument or ${ENV_VAR}), got {choice!r}")
  return choice


def pallas_supports(n: int, k: int) -> bool:
  """Whether the Mosaic GPU GEMM tiles this (N, K) (default config)."""
  from .w4a4_gpu import DEFAULT_CONFIG as cfg
  return n % (2 * cfg.tile_n) == 0 and k % cfg.tile_k == 0


# Below this many tokens the per-call XLA unpack of packed weights costs more than the in-register int4 unpack
# (measured on H100: M=4096 e2e 0.239 ms int4-in-registers vs 0.277 ms unpack+int8; M=32760 1.738 vs 1.630 ms).
INT8_UNPACK_MIN_M = 16384


def _weights_nk(w) -> tuple[int, int]:
  if w.ndim != 2 or w.dtype not in (jnp.uint8, jnp.int8):
    raise ValueError(f"W4A4 weights must be packed uint8 [N, K/2] or int8 [N, K] (int4 values), got "
                     f"{w.dtype} {w.shape}")
  return w.shape[0], w.shape[1] * (2 if w.dtype == jnp.uint8 else 1)


def _int8_weights(w):
  return w if w.dtype == jnp.int8 else reference.unpack_int4(w)


def _xla_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype):
  q_w = _int8_weights(w_packed)
  acc = lax.dot_general(q_x, q_w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  return reference.w4a4_epilogue(acc, s_x, s_w, x_lr, up, bias, out_dtype)


def _group_of(s_w, n: int, k: int, group_size: int | None) -> int | None:
  """The weight-scale group along K (None = per channel), checked against the shape of ``s_w``."""
  if group_size is None or group_size == k:
    if s_w.shape not in ((n,), (n, 1)):
      raise ValueError(f"W4A4 per-channel scales must be [N={n}] (or pass group_size), got {s_w.shape}")
    return None
  if k % group_size or s_w.shape != (n, k // group_size):
    raise ValueError(f"W4A4 group_size={group_size}: K={k} must be a multiple of it and s_w [N={n}, "
                     f"{k // group_size if group_size else '?'}], got s_w {s_w.shape}")
  return group_size


def _xla_grouped_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, group_size):
  # exact int32 product per group (int8 x int8 dot), f32 accumulation of the scaled groups in order
  int_dot = lambda a, b: lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  acc = reference.group_scaled_acc(q_x, _int8_weights(w_packed), s_w, group_size, int_dot=int_dot)
  return reference.w4a4_epilogue(acc, s_x, jnp.ones((acc.shape[1],), jnp.float32), x_lr, up, bias, out_dtype)


def _grouped_matmul(be, q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, group_size):
  n, k = _weights_nk(w_packed)
  if be == "reference":
    return reference.w4a4_g128_reference(q_x, s_x, _int8_weights(w_packed), s_w, x_lr, up, bias, out_dtype,
                                         group_size=group_size)
  r = 0 if x_lr is None else x_lr.shape[1]
  if be == "pallas" and _platform() == "gpu" and group_size == 128 and pallas_supports_g128(n, k) and not r % 16:
    from .w4a4_g128_gpu import w4a4_g128_matmul_gpu_any_m
    return w4a4_g128_matmul_gpu_any_m(q_x, s_x, _int8_weights(w_packed), s_w, x_lr, up, bias, out_dtype=out_dtype)
  return _xla_grouped_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, group_size)


def pallas_supports_g128(n: int, k: int) -> bool:
  """Whether the group-scaled (g128) Mosaic GPU GEMM tiles this (N, K) (default config)."""
  from .w4a4_g128_gpu import G128_CONFIG as cfg
  return n % (2 * cfg.tile_n) == 0 and k % cfg.tile_k == 0


def w4a4_matmul(q_x, s_x, w_packed, s_w, x_lr=None, up=None, bias=None, *, out_dtype=jnp.bfloat16,
                backend: str | None = None, group_size: int | None = None):
  """W4A4 GEMM on pre-quantized activations: q_x int8 [M, K], s_x [M], s_w [N], weights ``w_packed`` either packed
  uint8 [N, K/2] or already unpacked int8 [N, K] (int4 values; twice the memory, no per-call unpack).

  Optional low-rank branch x_lr [M, r] / up [r, N] and bias [N]. Returns [M, N] ``out_dtype``.

  ``group_size`` (e.g. 128): group-scaled weights, ``s_w`` f32 [N, K/group_size] (one scale per channel and group
  along K). The "pallas" backend runs the g128 Mosaic GPU kernel (``kernels.w4a4_g128_gpu``, int8 weights: packed
  codes are unpacked by one XLA pass) for group_size 128 on a GPU; other group sizes, the TPU and "xla" use an XLA
  loop over the groups (exact int32 per group, f32 accumulation); "reference" the int32-upcast reference.
  """
  be = select_backend(backend)
  n, k = _weights_nk(w_packed)
  group_size = _group_of(s_w, n, k, group_size)
  if group_size is not None:
    return _grouped_matmul(be, q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, group_size)
  s_w = s_w.reshape(n)
  if be == "reference":
    return reference.w4a4_epilogue(reference.int_matmul_nt(q_x, _int8_weights(w_packed)), s_x, s_w, x_lr, up, bias,
                                   out_dtype)
  r = 0 if x_lr is None else x_lr.shape[1]
  if be == "pallas" and _platform() == "tpu":
    from .w4a4_tpu import w4a4_matmul_tpu
    mode = "int8" if w_packed.dtype == jnp.int8 else "int4"
    return w4a4_matmul_tpu(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype=out_dtype, mode=mode)
  if be == "xla" or not pallas_supports(n, k) or r % 16:
    return _xla_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype)
  from .w4a4_gpu import w4a4_matmul_gpu_any_m
  if w_packed.dtype == jnp.uint8 and q_x.shape[0] < INT8_UNPACK_MIN_M:
    # small M: keep the weights packed and unpack int4 -> int8 in registers inside the kernel
    return w4a4_matmul_gpu_any_m(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype=out_dtype, weights="int4")
  # large M: one XLA pass unpacks the weights (~0.02-0.05 ms by bytes), then the faster int8-operand kernel
  return w4a4_matmul_gpu_any_m(q_x, s_x, _int8_weights(w_packed), s_w, x_lr, up, bias, out_dtype=out_dtype,
                               weights="int8")


def act_quant(x, smooth=None, down=None, clip=1.0, static_scale=None, *, backend: str | None = None,
              act_quant_impl: str = "xla"):
  """Fused activation quantization: (q_x int8 [M, K], s_x f32 [M], x_lr bf16 [M, r] or None).

  ``act_quant_impl="pallas"`` (pallas backend only) uses the single-pass Pallas quantizer (Triton backend): 11%
  faster at K=5120 and 4% slower at K=13824 on the H100 (docs/BENCHMARKS.md, "Kernels"); its f32 division is not
  IEEE-exact, so ~1e-7 of the codes differ by one from the reference at rounding ties. Default: the XLA function.
  """
  be = select_backend(backend)
  if act_quant_impl not in ("xla", "pallas"):
    raise ValueError(f"act_quant_impl must be 'xla' or 'pallas', got {act_quant_impl!r}")
  if be == "reference":
    return reference.act_quant(x, smooth, down, clip, static_scale)
  if be == "pallas" and act_quant_impl == "pallas":
    return act_quant_pallas(x, smooth, down, clip, static_scale)
  # pallas: fold the smoothing into `down` so the rank-r GEMM reads x directly (measured 15% faster on H100;
  # x_lr then differs from the reference by bf16 rounding only, q_x / s_x do not change)
  return act_quant_fused(x, smooth, down, clip, static_scale, fold_smooth=(be == "pallas"))


def w4a4_linear(x, w_packed, s_w, *, smooth=None, down=None, up=None, bias=None, clip=1.0, static_scale=None,
                out_dtype=jnp.bfloat16, backend: str | None = None, act_quant_impl: str = "xla",
                group_size: int | None = None):
  """W4A4 linear layer end to end on x [..., K]: act quant (+ low-rank down) then the W4A4 GEMM -> [..., N].

  Args:
    x: activations [..., K] (any float dtype).
    w_packed: uint8 [N, K/2] packed int4 weights (``reference.pack_int4`` convention), or int8 [N, K] int4 values
      (pre-unpacked once at load time: fastest on H100, 1 byte/parameter instead of 0.5).
    s_w: f32 [N] per-channel weight scales, or f32 [N, K/group_size] with ``group_size``.
    smooth: optional [K] smoothing divisor (activations are divided by it; fold it into the weights beforehand).
    down, up: optional low-rank branch, [K, r] and [r, N].
    bias: optional [N].
    clip: per-token abs-max multiplier (scalar, may be traced).
    static_scale: optional static activation scale (scalar, may be traced) replacing the dynamic one.
    out_dtype: output dtype (bf16 default).
    backend: "reference" | "xla" | "pallas" | None (see module docstring).
    act_quant_impl: "xla" (default) or "pallas" (see :func:`act_quant`).
    group_size: None (per-channel ``s_w``) or the weight-scale group along K (see :func:`w4a4_matmul`).
  """
  lead = x.shape[:-1]
  k = x.shape[-1]
  if _weights_nk(w_packed)[1] != k:
    raise ValueError(f"w4a4_linear: w_packed must be uint8 [N, K/2={k // 2}] or int8 [N, K={k}], got "
                     f"{w_packed.dtype} {w_packed.shape}")
  x2 = x.reshape(-1, k)
  q, s, x_lr = act_quant(x2, smooth, down, clip, static_scale, backend=backend, act_quant_impl=act_quant_impl)
  y = w4a4_matmul(q, s, w_packed, s_w, x_lr, up if x_lr is not None else None, bias, out_dtype=out_dtype,
                  backend=backend, group_size=group_size)
  return y.reshape(*lead, w_packed.shape[0])
