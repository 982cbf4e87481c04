"""Backend selection for the W4A4 linear: the only entry point ``wanjax.quant`` should call.

Backends:

* ``"pallas"``: Mosaic GPU kernels (Hopper: H100/H200): fused act quant + int8-``wgmma`` W4A4 GEMM with the fused
  scale/bias/low-rank epilogue. Needs N % 256 == 0 and K % 128 == 0 (all Wan2.2 linears); other shapes use "xla".
  On a TPU it selects the Pallas TPU kernel (``w4a4_tpu``; verified only in the interpreter, never on a TPU, hence
  not the TPU default), in its int8 mode on v5e/v5p/v6e and its FP8 mode from TPU7x on (:func:`tpu_mode`).
* ``"xla"``: the same math with XLA ops: int8 x int8 -> int32 ``dot_general`` (cuBLASLt IMMA on GPU, int8 MXU on
  TPU; on TPU7x, which has no integer MXU, an e4m3 x e4m3 -> f32 dot of the same int4 values), epilogue in f32.
  Fast everywhere, exact integer accumulation.
* ``"reference"``: ``kernels.reference`` (int32-upcast dot; the ground truth, slow on accelerators).

MXFP4 W4A4 (``mxfp4_linear`` / ``mxfp4_matmul``): "pallas" runs ``kernels.mxfp4_gpu`` (FP8 re-encoding + FP8
``wgmma``) on a GPU, "xla" an exact bf16 dequantization and a bf16 dot with f32 accumulation, "reference" the f32
HIGHEST dot.

Default: "pallas" on a CUDA GPU of compute capability 9.x, else "xla". Override with the environment variable
``WANJAX_KERNELS=reference|xla|pallas`` or the ``backend=`` argument.

This module only routes (backend, platform, shape and size thresholds -> which implementation runs); the
implementations are in ``w4a4_linear`` (INT4 GEMM variants), ``mxfp4_linear`` (MXFP4 glue), ``xla_paths`` (the XLA
paths), ``act_quant_gpu`` / ``mxfp4_act_gpu`` (activation quantizers) and the kernel modules.
"""

from __future__ import annotations

import functools

import os
import re

import jax
import jax.numpy as jnp

from wanjax.numerics.hadamard import hadamard_block_size

from . import act_quant_gpu, mxfp4_act_gpu, mxfp4_linear as mx, reference, w4a4_linear as w4, xla_paths as xp
from .two_level_act import two_level_act_quant
from .act_quant_gpu import act_quant_fused, act_quant_pallas
from .mxfp4_linear import MXFP4_BLOCK, MX_NAN_EXP  # noqa: F401  (the block the MXFP4 entry points take)

BACKENDS = ("reference", "xla", "pallas")
ACT_QUANT_IMPLS = ("xla", "pallas", "fused")
ENV_VAR = "WANJAX_KERNELS"


def _platform() -> str:
    try:
        return jax.devices()[0].platform
    except RuntimeError:  # pragma: no cover
        return "cpu"


def on_hopper() -> bool:
    """Whether the default device is an NVIDIA Hopper GPU (H100 / H200: compute capability 9.x)."""
    return _is_hopper()


def _is_hopper() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", "")
    return str(cc).startswith("9")


def tpu_generation(kind: str | None = None) -> int | None:
    """The TPU generation from a device kind ("TPU v5 lite" -> 5, "TPU v6e" -> 6, "TPU7x" -> 7); None if it is not a
    TPU kind. ``kind`` defaults to the first device's. (The TPU7x string is assumed from its name; no TPU ran here.)"""
    if kind is None:
        try:
            kind = jax.devices()[0].device_kind
        except RuntimeError:  # pragma: no cover
            return None
    hit = re.match(r"\s*TPU\s*v?(\d+)", str(kind), re.IGNORECASE)
    return int(hit.group(1)) if hit else None


def _tpu_fp8_only(kind: str | None = None) -> bool:
    """Whether this TPU's MXU has FP8 but no integer modes (TPU7x on)."""
    gen = tpu_generation(kind)
    return gen is not None and gen >= 7


def tpu_mode(w_dtype, kind: str | None = None) -> str:
    """The ``w4a4_tpu`` mode for weights of ``w_dtype`` on this TPU: "fp8" from TPU7x on (its MXU has FP8 but no
    integer modes), else "int8" for int8 weights and "int4" for packed ones (int8 MXU mode of v5e/v5p/v6e)."""
    if _tpu_fp8_only(kind):
        return "fp8"
    return "int8" if w_dtype == jnp.int8 else "int4"


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


def _gpu_gemm(be: str, n: int, k: int, r: int) -> bool:
    """Whether backend ``be`` runs the Mosaic GPU GEMM here: "pallas" on a GPU, a tiled (N, K), r % 16 == 0."""
    return be == "pallas" and _platform() == "gpu" and pallas_supports(n, k) and not r % 16


#: every integer up to this magnitude is exact in float8_e4m3fn (3 mantissa bits and the implicit 1)
FP8_EXACT_INT = 16

# Below this many tokens the per-call XLA unpack of packed weights costs more than the in-register int4 unpack;
# above it the unpack + int8-operand kernel is faster end to end (docs/BENCHMARKS.md, "Numbers formerly in
# docstrings").
INT8_UNPACK_MIN_M = 16384

# Below this many rows the fused act-quant kernel (one 64-row block per program, two passes over K) runs less than
# about a wave over the SMs and its per-block latency dominates; XLA's fusions are faster (the crossover by M:
# docs/BENCHMARKS.md, "Numbers formerly in docstrings"). In a 480p step this sends the cross-attention k/v
# projections of the 512 text tokens to XLA.
FUSED_ACT_QUANT_MIN_M = 16384
# The same threshold for a rotated input (the default recipe): there the XLA path is a rotation pass writing f32
# [M, K] plus the XLA act quant reading it, so the fused kernel, which rotates in registers, wins from fewer rows.
FUSED_ROT_ACT_QUANT_MIN_M = 16384


def pallas_supports_g128(n: int, k: int) -> bool:
    """Whether the group-scaled (g128) Mosaic GPU GEMM tiles this (N, K) (default config)."""
    from .w4a4_g128_gpu import G128_CONFIG as cfg

    return n % (2 * cfg.tile_n) == 0 and k % cfg.tile_k == 0


def w4a4_matmul(
    q_x,
    s_x,
    w_packed,
    s_w,
    x_lr=None,
    up=None,
    bias=None,
    *,
    out_dtype=jnp.bfloat16,
    backend: str | None = None,
    group_size: int | None = None,
    a_qmax: int = reference.INT4_QMAX,
    w_qmax: int = reference.INT4_QMAX,
):
    """W4A4 GEMM on pre-quantized activations: q_x int8 [M, K], s_x [M], s_w [N], weights ``w_packed`` either packed
    uint8 [N, K/2] or already unpacked int8 [N, K] (int4 values; twice the memory, no per-call unpack).

    Optional low-rank branch x_lr [M, r] / up [r, N] and bias [N]. Returns [M, N] ``out_dtype``.

    ``a_qmax``: the activation codes' range (7: INT4, 127: INT8 for W4A8; the GEMMs are integer GEMMs on int8
    operands either way, except TPU7x's FP8 MXU, which holds integers exactly only up to 16). ``w_qmax``: the same
    for the weights (127: INT8 weights per channel, given as int8 [N, K]: a mixed-precision recipe's 8-bit layers).

    ``group_size`` (e.g. 128): group-scaled weights, ``s_w`` f32 [N, K/group_size] (one scale per channel and group
    along K). The "pallas" backend runs the g128 Mosaic GPU kernel (``kernels.w4a4_g128_gpu``, int8 weights: packed
    codes are unpacked by one XLA pass) for group_size 128 on a GPU; other group sizes, the TPU and "xla" use an XLA
    loop over the groups (exact int32 per group, f32 accumulation); "reference" the int32-upcast reference.
    """
    be = select_backend(backend)
    n, k = w4.weights_nk(w_packed)
    group_size = w4.group_of(s_w, n, k, group_size)
    if a_qmax > FP8_EXACT_INT and be != "reference" and _platform() == "tpu" and _tpu_fp8_only():
        raise ValueError(
            f"activation codes up to {a_qmax} (INT8, W4A8) are not exact in the FP8 MXU of this TPU (integers up to "
            f"{FP8_EXACT_INT} are); use INT4 activations (the default recipe) here"
        )
    if w_qmax > FP8_EXACT_INT and be != "reference" and _platform() == "tpu" and _tpu_fp8_only():
        raise ValueError(
            f"weight codes up to {w_qmax} (INT8 weights) are not exact in the FP8 MXU of this TPU (integers up to "
            f"{FP8_EXACT_INT} are); use a recipe with INT4 weights only here"
        )
    if w_qmax > reference.INT4_QMAX and w_packed.dtype != jnp.int8:
        raise ValueError(f"weight codes up to {w_qmax} need int8 [N, K] weights, got {w_packed.dtype} {w_packed.shape}")
    r = 0 if x_lr is None else x_lr.shape[1]
    if group_size is not None:
        if be == "reference":
            return w4.grouped_reference_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, group_size)
        if be == "pallas" and _platform() == "gpu" and group_size == 128 and pallas_supports_g128(n, k) and not r % 16:
            return w4.g128_gpu_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype)
        return xp.w4a4_grouped_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, group_size)
    s_w = s_w.reshape(n)
    if be == "reference":
        return w4.reference_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype)
    if be == "pallas" and _platform() == "tpu":
        return w4.tpu_matmul(q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, mode=tpu_mode(w_packed.dtype))
    if be == "xla" or not pallas_supports(n, k) or r % 16:
        return xp.w4a4_matmul(
            q_x, s_x, w_packed, s_w, x_lr, up, bias, out_dtype, fp8_mxu=_platform() == "tpu" and _tpu_fp8_only()
        )
    # small M: keep the weights packed and unpack int4 -> int8 in registers inside the kernel; large M: one XLA pass
    # unpacks the weights, then the faster int8-operand kernel
    return w4.gpu_matmul(
        q_x,
        s_x,
        w_packed,
        s_w,
        x_lr,
        up,
        bias,
        out_dtype,
        in_registers=w_packed.dtype == jnp.uint8 and q_x.shape[0] < INT8_UNPACK_MIN_M,
    )


def act_quant(
    x,
    smooth=None,
    down=None,
    clip=1.0,
    static_scale=None,
    *,
    rot_signs=None,
    rot_block: int | None = None,
    backend: str | None = None,
    act_quant_impl: str = "fused",
    qmax: int = reference.INT4_QMAX,
):
    """Fused activation quantization: (q_x int8 [M, K], s_x f32 [M], x_lr bf16 [M, r] or None).

    ``qmax``: the code range ``[-qmax, qmax]`` (7: INT4 activations, the default; 127: INT8 activations, W4A8).

    Implementations on the "pallas" backend (on a GPU; elsewhere and on other backends the XLA function runs):

    * ``"fused"`` (default): one Pallas Triton kernel for codes, scales and the rank-r projection
      (``act_quant_gpu.act_quant_lowrank_pallas``), where :func:`act_quant_gpu.fused_supports` the shape (M >= 64,
      r = 0 or a power of two >= 16) and M >= ``FUSED_ACT_QUANT_MIN_M`` (fewer rows: less than a wave of blocks;
      ``FUSED_ROT_ACT_QUANT_MIN_M`` with ``rot_signs``),
      else ``"xla"``, with ``act_quant_gpu.FUSED_OPTIONS`` (``fast``: reciprocal multiplies instead of divisions).
      The fastest of the three at the 480p and 720p token counts (docs/BENCHMARKS.md, "The activation-quantization
      kernels are instruction-bound").
    * ``"pallas"``: the single-pass Pallas quantizer plus the folded XLA rank-r GEMM.
    * ``"xla"``: one jitted XLA function, smoothing folded into ``down``.

    Triton's f32 division is not IEEE-exact and ``fast`` multiplies by reciprocals, so in the Pallas impls a few in
    1e7 codes may differ by one from the reference where x / s lies within an ulp or two of a rounding boundary;
    scales agree to an ulp.

    ``rot_signs`` ([K] +-1, optional): the smoothed input is rotated before quantization and before ``down``, as
    ``numerics.hadamard.rotate_activations(x / smooth, rot_signs, rot_block)`` (the block: the largest power of two
    dividing K, at most ``rot_block``). The "fused" impl rotates inside the kernel for blocks of 64 to
    ``act_quant_gpu.ROT_DISPATCH_MAX_BLOCK`` (512, the largest block where it beat the XLA pass; bf16 tensor-core
    products: a few codes in 1e3 differ by one from the f32 rotation's); otherwise
    ``numerics.hadamard.rotate_activations_mxu`` rotates first (the kernel's numerics as one batched bf16 product on
    the tensor cores / MXU; on every backend, the reference included) and the unrotated path quantizes its output.
    """
    be = select_backend(backend)
    if act_quant_impl not in ACT_QUANT_IMPLS:
        raise ValueError(f"act_quant_impl must be one of {ACT_QUANT_IMPLS}, got {act_quant_impl!r}")
    r = 0 if down is None else down.shape[1]
    fused_gpu = be == "pallas" and act_quant_impl == "fused" and _platform() == "gpu"
    if rot_signs is not None:
        b = hadamard_block_size(x.shape[1], rot_block)
        in_kernel = 64 <= b <= act_quant_gpu.ROT_DISPATCH_MAX_BLOCK
        if (
            fused_gpu
            and in_kernel
            and x.shape[0] >= FUSED_ROT_ACT_QUANT_MIN_M
            and act_quant_gpu.fused_supports(*x.shape, r, chunk=b)
        ):
            return act_quant_gpu.act_quant_lowrank_pallas(
                x,
                smooth,
                down,
                clip,
                static_scale,
                qmax,
                rot_signs=rot_signs,
                chunk=b,
                **act_quant_gpu.rotation_options(b),
            )
        x, smooth = xp.rotate_smoothed(x, smooth, rot_signs, b), None
    if be == "reference":
        return reference.act_quant(x, smooth, down, clip, static_scale, qmax)
    if be == "pallas" and act_quant_impl == "pallas":
        return act_quant_pallas(x, smooth, down, clip, static_scale, qmax)
    if fused_gpu and x.shape[0] >= FUSED_ACT_QUANT_MIN_M and act_quant_gpu.fused_supports(x.shape[0], x.shape[1], r):
        return act_quant_gpu.act_quant_lowrank_pallas(
            x, smooth, down, clip, static_scale, qmax, **act_quant_gpu.FUSED_OPTIONS
        )
    # pallas: fold the smoothing into `down` so the rank-r GEMM reads x directly (faster, docs/BENCHMARKS.md "Kernels";
    # x_lr then differs from the reference by bf16 rounding only, q_x / s_x do not change)
    return act_quant_fused(x, smooth, down, clip, static_scale, qmax=qmax, fold_smooth=(be == "pallas"))


def act_quant_two_level(
    x,
    smooth=None,
    down=None,
    clip=1.0,
    *,
    group_size: int,
    levels: int,
    rot_signs=None,
    rot_block: int | None = None,
):
    """Activation quantization with two-level integer group scales: ``(c_x int8 [M, K], u_x f32 [M], x_lr)``, the
    carried codes ``q * m`` and per-token units that :func:`w4a4_matmul` (``a_qmax=127``) multiplies exactly
    (``kernels.two_level_act``). XLA on every backend: the Pallas act-quant kernels emit one scale per token and no
    group multipliers. ``rot_signs``: the smoothed input is rotated first, as in :func:`act_quant`."""
    if rot_signs is not None:  # the low-rank branch sees the rotated input too, as in act_quant
        x, smooth = xp.rotate_smoothed(x, smooth, rot_signs, hadamard_block_size(x.shape[1], rot_block)), None
    return two_level_act_quant(x, smooth, down, clip, group_size=group_size, levels=levels)


def w4a4_linear(
    x,
    w_packed,
    s_w,
    *,
    smooth=None,
    down=None,
    up=None,
    bias=None,
    clip=1.0,
    static_scale=None,
    out_dtype=jnp.bfloat16,
    backend: str | None = None,
    act_quant_impl: str = "fused",
    group_size: int | None = None,
    rot_signs=None,
    rot_block: int | None = None,
    a_qmax: int = reference.INT4_QMAX,
    w_qmax: int = reference.INT4_QMAX,
    parts: int = 1,
):
    """W4A4 linear layer end to end on x [..., K]: act quant (+ low-rank down) then the W4A4 GEMM -> [..., N].
    With ``a_qmax=127`` the activations are INT8 (W4A8): the same kernels (int8 tensor cores / MXU modes hold them).

    Args:
      x: activations [..., K] (any float dtype).
      w_packed: uint8 [N, K/2] packed int4 weights (``reference.pack_int4`` convention), or int8 [N, K] int4 values
        (pre-unpacked once at load time: the fastest GEMM operand, 1 byte/parameter instead of 0.5), or int8 [N, K]
        INT8 weights with ``w_qmax=127``.
      s_w: f32 [N] per-channel weight scales, or f32 [N, K/group_size] with ``group_size``.
      smooth: optional [K] smoothing divisor (activations are divided by it; fold it into the weights beforehand).
      down, up: optional low-rank branch, [K, r] and [r, N].
      bias: optional [N].
      clip: per-token abs-max multiplier (scalar, may be traced).
      static_scale: optional static activation scale (scalar, may be traced) replacing the dynamic one.
      out_dtype: output dtype (bf16 default).
      backend: "reference" | "xla" | "pallas" | None (see module docstring).
      act_quant_impl: "fused" (default), "pallas" or "xla" (see :func:`act_quant`).
      group_size: None (per-channel ``s_w``) or the weight-scale group along K (see :func:`w4a4_matmul`).
      rot_signs, rot_block: optional Hadamard rotation of the smoothed input (see :func:`act_quant`; fold its
        transpose into the weights beforehand, as ``quant.rotate.rotate``).
      parts: a fused layer of ``parts`` equal layers side by side (``wanjax.quant.fuse``: N and the rank split evenly,
        ``up`` block-diagonal): the input is quantized once (with the whole ``down``), then one GEMM per part on its
        rows of the weights and its rank slice of the low-rank branch (no zero blocks of ``up`` multiplied, the
        GEMM's own rank), the outputs joined along N. The same numbers as ``parts=1``: the skipped terms are exact
        zeros.
    """
    lead = x.shape[:-1]
    k = x.shape[-1]
    w4.check_linear_input(x, w_packed)
    x2 = x.reshape(-1, k)
    q, s, x_lr = act_quant(
        x2,
        smooth,
        down,
        clip,
        static_scale,
        rot_signs=rot_signs,
        rot_block=rot_block,
        backend=backend,
        act_quant_impl=act_quant_impl,
        qmax=a_qmax,
    )
    mm = functools.partial(
        w4a4_matmul, out_dtype=out_dtype, backend=backend, group_size=group_size, a_qmax=a_qmax, w_qmax=w_qmax
    )
    if parts == 1 or x_lr is None:
        y = mm(q, s, w_packed, s_w, x_lr, up if x_lr is not None else None, bias)
        return y.reshape(*lead, w_packed.shape[0])
    n, r = w_packed.shape[0], x_lr.shape[1]
    if n % parts or r % parts or up.shape != (r, n):
        raise ValueError(
            f"w4a4_linear(parts={parts}): N={n} and rank r={r} must split evenly into the parts and up be [r, N], "
            f"got up {tuple(up.shape)}"
        )
    npart, rpart = n // parts, r // parts
    ys = []
    for i in range(parts):
        cols, rk = slice(i * npart, (i + 1) * npart), slice(i * rpart, (i + 1) * rpart)
        b = None if bias is None else bias[cols]
        ys.append(mm(q, s, w_packed[cols], s_w[cols], x_lr[:, rk], up[rk, cols], b).reshape(*lead, npart))
    return jnp.concatenate(ys, axis=-1)


# ------------------------------------------------------------------------------------------------------ MXFP4
def mxfp4_matmul(
    xv,
    xe,
    wv,
    we,
    x_lr=None,
    up=None,
    bias=None,
    *,
    out_dtype=jnp.bfloat16,
    backend: str | None = None,
    block: int = MXFP4_BLOCK,
    interpret: bool = False,
    config=None,
):
    """MXFP4 x MXFP4 GEMM on decoded operands: ``x = xv * 2**xe`` [M, K], ``w = wv * 2**we`` [N, K] (per block of 32
    along K), ``out = x @ w^T + x_lr @ up + bias`` -> ``(out [M, N] out_dtype, inexact_rows int32)``.

    Backends: "reference": exact f32 dequantization, f32 dot at HIGHEST precision; "xla": exact bf16 dequantization
    (every MXFP4 value is a bf16) and a bf16 x bf16 -> f32 dot (tensor cores on GPU; products exact, f32
    accumulation); "pallas" on a GPU with N % 256 == K % 128 == 0, r % 16 == 0 and block 32: ``kernels.mxfp4_gpu``
    (each row re-encoded to e4m3 with a power-of-two row scale, FP8 ``wgmma``; M zero-padded to a multiple of 8 and
    at least one tile), else "xla". The kernel path's accuracy against "reference" and its speed on a GPU:
    docs/BENCHMARKS.md, "MXFP4 on the GPU".

    ``inexact_rows``: rows of x plus rows of w that the FP8 re-encoding could not represent exactly (block exponents
    more than 8 binades below the row's largest); always 0 on the exact "reference" / "xla" paths.
    Blocks with exponent 128 (E8M0 NaN) make their output row (x) or column (w) NaN, as ``numerics.formats.dequantize``.
    ``interpret`` / ``config`` (tests): run the "pallas" kernel path in the Mosaic GPU interpreter with that tiling.
    """
    be = select_backend(backend)
    mx.check_operands(xv, xe, wv, we, block)
    n, k = wv.shape
    r = 0 if x_lr is None else x_lr.shape[1]
    inexact = jnp.int32(0)
    if (
        be == "pallas"
        and (interpret or _platform() == "gpu")
        and block == 32
        and not r % 16
        and (config is not None or pallas_supports(n, k))
    ):
        y, inexact = mx.pallas_matmul(xv, xe, wv, we, x_lr, up, bias, config=config, interpret=interpret)
    else:
        y = xp.mxfp4_matmul(xv, xe, wv, we, x_lr, up, bias, block, exact=be == "reference")
    return mx.nan_rows(y, xe, we).astype(out_dtype), inexact


def mxfp4_linear(
    x,
    w_codes,
    w_scales,
    *,
    smooth=None,
    down=None,
    up=None,
    bias=None,
    clip=1.0,
    exp_offset=0,
    scale_rule: str = "safe_ceil",
    out_dtype=jnp.bfloat16,
    backend: str | None = None,
    return_inexact: bool = False,
    act_quant_impl: str = "fused",
):
    """MXFP4 W4A4 linear end to end on ``x [..., K]``: MXFP4 activation quantization, low-rank down, MXFP4 GEMM.

    Args:
      x: activations [..., K] (any float dtype).
      w_codes: uint8 MXFP4 weight codes, packed [N, K/2] (``numerics.pack`` layout) or [N, K].
      w_scales: uint8 E8M0 weight scale codes [N, K/32].
      smooth: optional [K] smoothing divisor; down, up: optional low-rank branch [K, r] / [r, N]; bias: optional [N].
      clip, exp_offset: the activation block abs-max multiplier and MX exponent offset of the active timestep bin
        (scalars, may be traced).
      scale_rule: activation scale rule ("safe_ceil", the seed's, or "ocp_floor").
      out_dtype: output dtype; backend: see :func:`mxfp4_matmul`.
      return_inexact: also return the number of rows the FP8 re-encoding rounded (kernel path only; 0 elsewhere).
      act_quant_impl: the kernel path's activation side, "fused" or "xla" (see :func:`mxfp4_linear_fp8`).

    ``x_lr = bf16(bf16(x / smooth) @ bf16(down))`` as for the INT4 path. On the GPU kernel path the weights are
    re-encoded to FP8 inside the call (``mxfp4_gpu.prepare_weights``) and the activations quantized straight into FP8
    (:func:`mxfp4_linear_fp8`); to re-encode the weights once at load time call those two directly.
    """
    be = select_backend(backend)
    n, k = w_scales.shape[0], w_scales.shape[-1] * MXFP4_BLOCK
    r = 0 if down is None else down.shape[1]
    if _gpu_gemm(be, n, k, r) and x.shape[-1] == k:
        # the kernel path: weights re-encoded to FP8 inside the call (prepare_weights; ideally once at load time) and
        # activations quantized straight into FP8 (same numbers as below, no f32 intermediates in memory)
        from .mxfp4_gpu import prepare_weights

        w8, s_w, bad_w = prepare_weights(w_codes, w_scales)
        y, bad_x = mxfp4_linear_fp8(
            x,
            w8,
            s_w,
            smooth=smooth,
            down=down,
            up=up,
            bias=bias,
            clip=clip,
            exp_offset=exp_offset,
            scale_rule=scale_rule,
            out_dtype=out_dtype,
            backend=be,
            return_inexact=True,
            act_quant_impl=act_quant_impl,
        )
        return (y, bad_x + bad_w) if return_inexact else y
    lead = x.shape[:-1]
    k = x.shape[-1]
    wv, we = mx.mxfp4_decode(w_codes, w_scales)
    if wv.shape[1] != k:
        raise ValueError(f"mxfp4_linear: weights have K={wv.shape[1]}, activations K={k}")
    x2 = x.reshape(-1, k)
    xv, xe = mx.mxfp4_act_quant(x2, smooth, clip, exp_offset, scale_rule=scale_rule)
    x_lr = None if down is None else reference.lowrank_down(x2, down, smooth)
    y, inexact = mxfp4_matmul(
        xv, xe, wv, we, x_lr, up if x_lr is not None else None, bias, out_dtype=out_dtype, backend=backend
    )
    y = y.reshape(*lead, wv.shape[0])
    return (y, inexact) if return_inexact else y


def mxfp4_linear_fp8(
    x,
    w8,
    s_w,
    *,
    smooth=None,
    down=None,
    up=None,
    bias=None,
    clip=1.0,
    exp_offset=0,
    scale_rule: str = "safe_ceil",
    out_dtype=jnp.bfloat16,
    backend: str | None = None,
    return_inexact: bool = False,
    act_quant_impl: str = "fused",
):
    """MXFP4 W4A4 linear on weights prepared once at load time by ``kernels.mxfp4_gpu.prepare_weights``.

    ``x [..., K]`` is MXFP4-quantized (block exponents with ``scale_rule`` / ``exp_offset`` / ``clip``, E2M1 elements)
    straight into e4m3 with one power-of-two scale per token (``mxfp4_gpu.act_to_fp8``), then
    ``y = (x8 @ w8^T) * s_x[m] * s_w[n] + x_lr @ up + bias`` with ``x_lr = bf16(bf16(x / smooth) @ bf16(down))``.
    ``w8`` float8_e4m3fn [N, K], ``s_w`` f32 [N] (NaN rows give NaN outputs, as an E8M0 NaN block does).

    Backends: "pallas" (GPU, N % 256 == K % 128 == 0, r % 16 == 0): the FP8 ``wgmma`` kernel of ``w4a4_gpu``;
    "xla": exact bf16 upcast of both FP8 operands, bf16 tensor-core dot with f32 accumulation; "reference": f32
    HIGHEST dot. The per-call work is the activation quantization and the GEMM only (no weight decoding).
    ``return_inexact``: also return the activation rows the FP8 re-encoding rounded (weights: count at load time).
    ``act_quant_impl``: "fused" (default) runs the activation side as one Triton kernel
    (``mxfp4_act_gpu.act_to_fp8_pallas``, which also computes x_lr as ``bf16(x) @ bf16(down / smooth)``) on a GPU with
    the "pallas" backend, M >= ``FUSED_ACT_QUANT_MIN_M`` and a supported shape; otherwise, or with "xla", the XLA
    ``act_to_fp8`` and a separate low-rank GEMM run.
    """
    if act_quant_impl not in ("fused", "xla"):
        raise ValueError(f"mxfp4_linear_fp8: act_quant_impl must be 'fused' or 'xla', got {act_quant_impl!r}")
    be = select_backend(backend)
    lead, k = x.shape[:-1], x.shape[-1]
    n = w8.shape[0]
    mx.check_fp8_weights(w8, s_w, k)
    x2 = x.reshape(-1, k)
    r_dn = 0 if down is None else down.shape[1]
    if (
        be == "pallas"
        and act_quant_impl == "fused"
        and _platform() == "gpu"
        and x2.shape[0] >= FUSED_ACT_QUANT_MIN_M
        and mxfp4_act_gpu.supports(x2.shape[0], k, r_dn)
    ):
        x8, s_x, inexact, x_lr = mx.act_to_fp8_fused(x2, smooth, down, clip, exp_offset, scale_rule)
    else:
        x8, s_x, inexact, x_lr = mx.act_to_fp8_xla(x2, smooth, down, clip, exp_offset, scale_rule)
    u = up if x_lr is not None else None
    r = 0 if x_lr is None else x_lr.shape[1]
    if _gpu_gemm(be, n, k, r):
        y = mx.fp8_gpu_matmul(x8, s_x, w8, s_w, x_lr, u, bias, out_dtype)
    elif be == "pallas" and _platform() == "tpu" and _tpu_fp8_only():
        y = mx.fp8_tpu_matmul(x8, s_x, w8, s_w, x_lr, u, bias, out_dtype)
    else:
        y = xp.fp8_matmul(x8, s_x, w8, s_w, x_lr, u, bias, out_dtype, exact=be == "reference")
    y = y.reshape(*lead, n)
    return (y, inexact) if return_inexact else y
