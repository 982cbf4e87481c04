"""``QLinear``: a quantized drop-in for ``wanjax.model.layers.Linear`` (same call: ``y = layer(x)``).

What it holds (all arrays may carry a leading layer axis L when the layer lives in the scanned, stacked blocks; the
scan slices it away before ``__call__`` runs):

=================== ============================== ==========================================================
variable            shape / dtype                  meaning
=================== ============================== ==========================================================
``qweight``         uint8 [N, K/2] (4-bit, packed)  weight codes (``numerics.pack`` layout, K-major); int8 [N, K]
                    or int8 [N, K] (int8 weights)   for 8-bit weights
``wscale``          [N, K/g]                        weight scales in the format's native dtype (f32 int, uint8
                                                    E8M0 mxfp4, float8_e4m3fn nvfp4); per channel: [N, 1]
``wtensor_scale``   f32 []  (nvfp4 only)            NVFP4 per-tensor scale
``wunit``           f32 [N] (two-level only)        the row units of two-level integer group scales
                                                    (``w_scale_levels``): ``wscale = f32(m * wunit)``, m integer
``smooth``          f32 [K] or None                 smoothing divisor: the layer sees ``x / smooth``
``rot_signs``       f32 [K] or None                 Hadamard rotation of the (smoothed) input (``quant.rotate``)
``down`` / ``up``   [K, r] / [r, N] bf16 or None    low-rank branch on the smoothed (rotated) input
``bias``            [N] or None                     bias
``act_clip``        f32 [B]                         per timestep bin: clip ratio of the dynamic abs-max
``act_exp_offset``  int32 [B]                       per bin: MX exponent offset (mxfp4 activations; 0 otherwise)
``act_scale``       f32 [B] or None                 per bin: static activation scale (``act_mode="static"``)
``kweight``         float8_e4m3fn [N, K] (mxfp4),   the weights as the GPU kernel reads them, made once by
                    int8 [N, K] (int4 per channel,  ``quant.apply.prepare_kernel_weights``: MXFP4 rows re-encoded
                    or two-level: carried q * m)    to e4m3, or int4 codes unpacked to int8 (two-level: times their
                    or None                         group multipliers); real mode then skips
                                                    the per-call re-encoding / unpacking (1 byte a parameter on
                                                    top of the codes)
``kscale``          f32 [N] or None                 with ``kweight``: the row scales (MXFP4: powers of two, NaN
                                                    rows; int4: ``wscale``; two-level: ``wunit``)
``lora_down``       [K, R] bf16 or None             run-time LoRA rank appended to the low-rank branch
``lora_up``         [R, N] bf16 or None             (:func:`set_lora`, ``wanjax.lora``): ``lora_down`` is already
``lora_scale``      f32 [R] or None                 folded for this layer's smoothing / rotation; ``lora_scale``
                                                    is each rank column's strength x alpha / rank. Never
                                                    serialized by artifacts (None unless a LoRA is set)
=================== ============================== ==========================================================

The forward (``x`` of any float dtype, ``[..., K]``)::

    x_s = f32(x) / smooth ; x_r = rotate(x_s)                       (each only if present)
    y   = QDQ_act(x_r; table[bin]) @ dequant(W)^T + (x_r @ down) @ up + bias
    (with a LoRA set: down <- [down | lora_down], up <- [up ; lora_scale * lora_up], one branch of rank r + R)

``mode="fake"`` computes exactly that with the matmul operands in ``dtype`` (bf16 by default, fp32 accumulation; the
QDQ and the weight dequantization are bit-exact ``wanjax.numerics.formats`` math); ``mode="real"`` calls
``wanjax.kernels.dispatch.w4a4_linear`` (integer GEMM; int4 weights per channel or in groups of 128 along K, or int8
weights per channel (``Recipe.weight_overrides``), with int4 or int8 per-token activations: W4A4 or W4A8, the same
int8 tensor-core GEMM; two-level integer group scales,
``w_scale_levels`` / ``a_scale_levels``, run on the per-channel int8 GEMM with carried int8 codes ``q * m`` and the
row / token units as scales, the group-scaled product exactly) or ``wanjax.kernels.dispatch.mxfp4_linear`` (MXFP4 weights and activations in blocks of 32,
the bin's ``act_exp_offset`` applied as in fake mode; ``mxfp4_linear_fp8`` on ``kweight``, or int8 ``kweight`` for
``w4a4_linear``, where ``prepare_kernel_weights`` stored them): the formats the kernels implement. The timestep bin is read
from :func:`active_bin` (a traced int32 is fine, so changing bins never recompiles); a layer with a single bin needs
no bin.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from wanjax.numerics import formats
from wanjax.numerics.hadamard import rotate_activations_mxu
from wanjax.numerics.table import INT_FORMATS, INT_QMAX, LINEAR_FORMATS
from wanjax.numerics.two_level import carried_from_scales, check_scale_levels
from wanjax.quant.rtn import ActQuantSpec

__all__ = [
    "LoraVar",
    "QLinear",
    "QLinearConfig",
    "QVar",
    "active_bin",
    "carried_weights",
    "clear_lora",
    "current_bin",
    "qlinear_apply",
    "set_lora",
]

_ACTIVE_BIN: contextvars.ContextVar = contextvars.ContextVar("wanjax_quant_active_bin", default=None)

_W_FMTS = LINEAR_FORMATS
_A_FMTS = LINEAR_FORMATS + (None,)
MODES = ("fake", "real")
ACT_MODES = ("dynamic", "static")
REAL_W_GROUP = 128  # the group-scaled int4 weights mode="real" runs (kernels/w4a4_g128_gpu.py), besides per channel
REAL_A_FMTS = ("int4", "int8")  # activations of the integer kernels: INT4 (W4A4) or INT8 (W4A8), per token
REAL_MX_BLOCK = 32  # the MXFP4 block mode="real" runs (kernels.dispatch.mxfp4_linear), weights and activations


@contextlib.contextmanager
def active_bin(index):
    """Selects the timestep bin used by every :class:`QLinear` traced inside the block.

    ``index`` is a Python int or an int32 scalar (traced inside ``jax.jit``: pass it as an argument of the jitted
    function so that every bin runs the same compiled program). Out-of-range indices are clamped by JAX's gather.
    """
    token = _ACTIVE_BIN.set(index)
    try:
        yield
    finally:
        _ACTIVE_BIN.reset(token)


def current_bin():
    """The bin index set by the innermost :func:`active_bin`, or None."""
    return _ACTIVE_BIN.get()


class QVar(nnx.Variable):
    """Variable type of every quantized-layer array (codes, scales, smoothing, low-rank, bin tables)."""


class LoraVar(nnx.Variable):
    """Variable type of a run-time LoRA on a QLinear (``lora_down``, ``lora_up``, ``lora_scale``): not part of the
    quantized layer, set and cleared by :func:`set_lora` / :func:`clear_lora` (``wanjax.lora``)."""


@dataclasses.dataclass(frozen=True)
class QLinearConfig:
    """Static description of a quantized linear (hashable; part of the graph definition, not of the state).

    The activation quantizer is stored as the flat ``a_*`` fields (the format artifacts serialize) and used as one
    `wanjax.quant.rtn.ActQuantSpec`: :attr:`act_spec` (``act_fields`` builds the fields from a spec).

    Attributes:
      in_features, out_features: K and N.
      w_fmt: weight format ``"int4" | "int8" | "mxfp4" | "nvfp4"``.
      w_group: elements per weight scale along K (K for per-channel int scales; 32 mxfp4; 16 nvfp4).
      a_fmt: activation format (same choices) or None for weight-only quantization.
      a_group: activation group along K (None = one scale per token for int formats; block size for FP4).
      a_scale_rule: mxfp4 activation scale rule (``"safe_ceil"``, the seed's, or ``"ocp_floor"``).
      act_mode: ``"dynamic"`` (per-token abs-max x clip[bin]) or ``"static"`` (per-bin scale, int formats only).
      rot_block: largest Hadamard block (None: the largest power of two dividing K; see
        ``numerics.hadamard.hadamard_block_size``).
      nbins: number of timestep bins (leading axis of the bin tables).
      parts: 1, or the number of equal layers a fused layer joins side by side (``wanjax.quant.fuse``; its ``up``
        block-diagonal): real mode then quantizes the input once and runs one GEMM per part
        (``dispatch.w4a4_linear(parts=)``, the same numbers).
      w_scale_levels: None, or ``L`` in [1, 18]: int4 weights with two-level integer group scales (``wscale =
        f32(m * wunit)``, m integer in [1, L]; ``wanjax.numerics.two_level``); real mode runs them on the per-channel
        int8 GEMM as carried int8 ``q * m`` with row scales ``wunit``.
      a_scale_levels: None, or ``L``: int4 activations in groups of ``a_group`` with two-level integer scales (one
        unit per token); real mode quantizes them to carried int8 codes (XLA, ``dispatch.act_quant_two_level``).
    """

    in_features: int
    out_features: int
    w_fmt: str = "int4"
    w_group: int | None = None
    a_fmt: str | None = "int4"
    a_group: int | None = None
    a_scale_rule: str = "safe_ceil"
    act_mode: str = "dynamic"
    rot_block: int | None = None
    nbins: int = 1
    parts: int = 1
    w_scale_levels: int | None = None
    a_scale_levels: int | None = None

    def __post_init__(self):
        if self.w_fmt not in _W_FMTS:
            raise ValueError(f"QLinearConfig: w_fmt must be one of {_W_FMTS}, got {self.w_fmt!r}")
        if self.a_fmt not in _A_FMTS:
            raise ValueError(f"QLinearConfig: a_fmt must be one of {_A_FMTS}, got {self.a_fmt!r}")
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"QLinearConfig: act_mode must be one of {ACT_MODES}, got {self.act_mode!r}")
        if self.act_mode == "static" and self.a_fmt not in INT_FORMATS:
            raise ValueError(f"QLinearConfig: act_mode='static' needs a_fmt int4/int8, got {self.a_fmt!r}")
        if self.act_mode == "static" and self.a_group is not None:
            raise ValueError(
                "QLinearConfig: act_mode='static' uses one scale per bin (a_group must be None), got "
                f"a_group={self.a_group}"
            )
        if self.nbins < 1:
            raise ValueError(f"QLinearConfig: nbins must be >= 1, got {self.nbins}")
        if self.parts < 1 or self.out_features % self.parts:
            raise ValueError(
                f"QLinearConfig: parts must be >= 1 and divide out_features={self.out_features}, got {self.parts}"
            )
        if self.in_features % 2:
            raise ValueError(
                f"QLinearConfig: in_features must be even (two 4-bit codes per byte), got {self.in_features}"
            )
        g = self.in_features if self.w_group is None else self.w_group
        if self.in_features % g:
            raise ValueError(f"QLinearConfig: w_group={g} does not divide in_features={self.in_features}")
        object.__setattr__(self, "w_group", g)
        self._check_levels()

    def _check_levels(self) -> None:
        if self.w_scale_levels is not None:
            check_scale_levels("QLinearConfig.w_scale_levels", self.w_scale_levels)
            if self.w_fmt != "int4":
                raise ValueError(f"QLinearConfig: w_scale_levels needs w_fmt='int4', got {self.w_fmt!r}")
        if self.a_scale_levels is not None:
            check_scale_levels("QLinearConfig.a_scale_levels", self.a_scale_levels)
            if self.a_fmt != "int4" or self.a_group is None or self.act_mode != "dynamic":
                raise ValueError(
                    "QLinearConfig: a_scale_levels needs dynamic int4 activations with an a_group, got "
                    f"a_fmt={self.a_fmt!r}, a_group={self.a_group!r}, act_mode={self.act_mode!r}"
                )

    @property
    def two_level(self) -> bool:
        """Whether weights or activations have two-level integer group scales."""
        return self.w_scale_levels is not None or self.a_scale_levels is not None

    @property
    def act_spec(self) -> ActQuantSpec | None:
        """The activation quantizer of the layer (`wanjax.quant.rtn.ActQuantSpec` from the ``a_*`` fields; None for
        weight-only layers). Its clip / exponent offset / static scale come from the per-bin tables at call time; with
        ``act_mode="static"`` the table's scale goes to ``ActQuantSpec.qdq(static_scale=...)``."""
        if self.a_fmt is None:
            return None
        return ActQuantSpec(self.a_fmt, self.a_group, scale_rule=self.a_scale_rule, scale_levels=self.a_scale_levels)

    @staticmethod
    def act_fields(spec: ActQuantSpec | None) -> dict:
        """The ``a_*`` fields (``a_fmt``, ``a_group``, ``a_scale_rule``) that describe ``spec``; the inverse of
        :attr:`act_spec` (the fields are what artifacts serialize)."""
        if spec is None:
            return {"a_fmt": None, "a_group": None, "a_scale_rule": "safe_ceil", "a_scale_levels": None}
        return {
            "a_fmt": spec.fmt,
            "a_group": spec.group_size,
            "a_scale_rule": spec.scale_rule,
            "a_scale_levels": spec.scale_levels,
        }

    @property
    def packed(self) -> bool:
        """Whether the weight codes are packed two per byte."""
        return self.w_fmt in formats.FOUR_BIT_FORMATS

    def real_mode_problem(self) -> str | None:
        """Why ``mode="real"`` cannot run this layer (None if it can)."""
        if self.two_level:
            return self._two_level_problem()
        if self.w_fmt == "mxfp4" and self.w_group == REAL_MX_BLOCK:
            if self.a_fmt != "mxfp4" or (self.a_group or REAL_MX_BLOCK) != REAL_MX_BLOCK:
                return (
                    f"weights are mxfp4 but activations are {self.a_fmt} with group {self.a_group}; the MXFP4 kernels "
                    f"need mxfp4 activations in blocks of {REAL_MX_BLOCK}"
                )
            return None
        int4_ok = self.w_fmt == "int4" and self.w_group in (self.in_features, REAL_W_GROUP)
        if not int4_ok and not (self.w_fmt == "int8" and self.w_group == self.in_features):
            return (
                f"weights are {self.w_fmt} with group {self.w_group}; the kernels need int4 per output channel or in "
                f"groups of {REAL_W_GROUP} along K, int8 per output channel, or mxfp4 in blocks of {REAL_MX_BLOCK} "
                "(with mxfp4 activations)"
            )
        if self.a_fmt not in REAL_A_FMTS or self.a_group is not None:
            return (
                f"activations are {self.a_fmt} with group {self.a_group}; the kernels need int4 (W4A4) or int8 (W4A8) "
                "per token"
            )
        return None

    def _two_level_problem(self) -> str | None:
        """Real mode of a layer with two-level scales: the per-channel int8 GEMM on carried codes."""
        if self.w_fmt != "int4" or (self.w_scale_levels is None and self.w_group != self.in_features):
            return (
                f"weights are {self.w_fmt} with group {self.w_group} and scale levels {self.w_scale_levels}; with "
                "two-level scales the per-channel int8 GEMM needs int4 weights per channel or two-level"
            )
        if self.a_scale_levels is None and (self.a_fmt not in REAL_A_FMTS or self.a_group is not None):
            return (
                f"activations are {self.a_fmt} with group {self.a_group}; the kernels need int4 (W4A4) or int8 "
                "(W4A8) per token, or int4 with two-level scales"
            )
        return None


def _check_shape(path, name, arr, expected):
    if arr is None:
        return
    got = tuple(arr.shape)
    if got[len(got) - len(expected) :] != tuple(expected) or len(got) - len(expected) not in (0, 1):
        raise ValueError(
            f"QLinear {path!r}: {name} must have shape {tuple(expected)} (optionally with a leading layer "
            f"axis), got {got}"
        )


# weight format -> the dtype of its kernel-ready weights (``kweight``)
KERNEL_WEIGHT_DTYPES = {"mxfp4": jnp.float8_e4m3fn, "int4": jnp.int8}


def _check_kernel_weights(c: QLinearConfig, path: str, kweight, kscale) -> None:
    """``kweight`` / ``kscale`` (kernel-ready weights): together; mxfp4 (e4m3) or per-channel int4 (int8) layers only;
    [N, K] and f32 [N]."""
    if kweight is None and kscale is None:
        return
    if kweight is None or kscale is None:
        raise ValueError(
            f"QLinear {path!r}: kweight and kscale come together (got kweight={kweight is not None}, "
            f"kscale={kscale is not None})"
        )
    if c.w_fmt not in KERNEL_WEIGHT_DTYPES or (
        c.w_fmt == "int4" and c.w_group != c.in_features and c.w_scale_levels is None
    ):
        raise ValueError(
            f"QLinear {path!r}: kweight (kernel-ready weights) is for mxfp4, per-channel int4 or two-level int4 "
            f"weights, the layer's are {c.w_fmt} with group {c.w_group}"
        )
    want = KERNEL_WEIGHT_DTYPES[c.w_fmt]
    if jnp.dtype(kweight.dtype) != want or jnp.dtype(kscale.dtype) != jnp.float32:
        raise ValueError(
            f"QLinear {path!r}: kweight must be {jnp.dtype(want).name} and kscale float32 for {c.w_fmt} "
            f"weights (from quant.apply.prepare_kernel_weights), got {kweight.dtype} and {kscale.dtype}"
        )
    _check_shape(path, "kweight", kweight, (c.out_features, c.in_features))
    _check_shape(path, "kscale", kscale, (c.out_features,))


#: The arrays of a QLinear that artifacts store (the derived kernel-ready ``kweight`` / ``kscale`` are not).
STORED_FIELDS = (
    "qweight",
    "wscale",
    "wtensor_scale",
    "smooth",
    "rot_signs",
    "down",
    "up",
    "bias",
    "act_clip",
    "act_exp_offset",
    "act_scale",
    "wunit",
)


class QLinear(nnx.Module):
    """Quantized linear layer; see the module docstring for the variables and the forward.

    Args:
      config: :class:`QLinearConfig`.
      qweight, wscale, wtensor_scale, smooth, rot_signs, down, up, bias, kweight, kscale, wunit: arrays as in the
        module table (``wunit`` is required iff ``config.w_scale_levels`` is set).
      act_clip, act_exp_offset, act_scale: per-bin tables ``[B]`` (``act_exp_offset`` defaults to zeros;
        ``act_scale`` is required iff ``config.act_mode == "static"``).
      dtype: compute dtype of the matmul operands and of the result (as ``Linear.dtype``).
      mode: ``"fake"`` or ``"real"``.
      path: dotted layer name (``"blocks.self_attn.q"``).
    """

    def __init__(
        self,
        config: QLinearConfig,
        *,
        qweight,
        wscale,
        act_clip,
        wtensor_scale=None,
        smooth=None,
        rot_signs=None,
        down=None,
        up=None,
        bias=None,
        act_exp_offset=None,
        act_scale=None,
        kweight=None,
        kscale=None,
        wunit=None,
        dtype=jnp.bfloat16,
        mode: str = "fake",
        path: str = "",
    ):
        c = config
        k, n = c.in_features, c.out_features
        _check_shape(path, "qweight", qweight, (n, k // 2) if c.packed else (n, k))
        _check_shape(path, "wscale", wscale, (n, k // c.w_group))
        _check_shape(path, "smooth", smooth, (k,))
        _check_shape(path, "rot_signs", rot_signs, (k,))
        _check_shape(path, "bias", bias, (n,))
        _check_shape(path, "act_clip", act_clip, (c.nbins,))
        if (down is None) != (up is None):
            raise ValueError(
                f"QLinear {path!r}: down and up come together (got down={down is not None}, up={up is not None})"
            )
        if down is not None:
            r = down.shape[-1]
            _check_shape(path, "down", down, (k, r))
            _check_shape(path, "up", up, (r, n))
        if (act_scale is None) == (c.act_mode == "static"):
            raise ValueError(
                f"QLinear {path!r}: act_scale [B] is required iff act_mode='static' (act_mode="
                f"{c.act_mode!r}, act_scale given: {act_scale is not None})"
            )
        if (wtensor_scale is None) == (c.w_fmt == "nvfp4"):
            raise ValueError(f"QLinear {path!r}: wtensor_scale is required iff w_fmt='nvfp4'")
        if (wunit is None) == (c.w_scale_levels is not None):
            raise ValueError(
                f"QLinear {path!r}: wunit [N] (two-level row units) is required iff w_scale_levels is set "
                f"(w_scale_levels={c.w_scale_levels}, wunit given: {wunit is not None})"
            )
        _check_shape(path, "wunit", wunit, (n,))
        _check_kernel_weights(c, path, kweight, kscale)
        if act_exp_offset is None:
            act_exp_offset = jnp.zeros(jnp.shape(act_clip), jnp.int32)
        _check_shape(path, "act_exp_offset", act_exp_offset, (c.nbins,))
        _check_shape(path, "act_scale", act_scale, (c.nbins,))
        if mode not in MODES:
            raise ValueError(f"QLinear {path!r}: mode must be one of {MODES}, got {mode!r}")
        if mode == "real" and c.real_mode_problem():
            raise ValueError(f"QLinear {path!r}: mode='real' unavailable: {c.real_mode_problem()}; use mode='fake'")

        def var(a):
            return None if a is None else QVar(jnp.asarray(a))

        self.config = c
        self.qweight = var(qweight)
        self.wscale = var(wscale)
        self.wtensor_scale = var(wtensor_scale)
        self.smooth = var(smooth)
        self.rot_signs = var(rot_signs)
        self.down = var(down)
        self.up = var(up)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.act_clip = var(jnp.asarray(act_clip, jnp.float32))
        self.act_exp_offset = var(jnp.asarray(act_exp_offset, jnp.int32))
        self.act_scale = var(None if act_scale is None else jnp.asarray(act_scale, jnp.float32))
        self.kweight = var(kweight)
        self.kscale = var(kscale)
        self.wunit = var(None if wunit is None else jnp.asarray(wunit, jnp.float32))
        self.lora_down = self.lora_up = self.lora_scale = None  # run-time LoRA: set_lora / clear_lora
        self.in_features, self.out_features = k, n
        self.dtype = dtype
        self.mode = mode
        self.path = path

    def arrays(self) -> dict:
        """The layer's arrays by name (None where absent), e.g. for :func:`qlinear_apply`."""
        names = (*STORED_FIELDS, "kweight", "kscale")  # + the kernel-ready weights derived at attach time
        out = {n: (None if getattr(self, n) is None else getattr(self, n)[...]) for n in names}
        if getattr(self, "lora_down", None) is not None:  # only when a LoRA is set: artifacts never see these
            out.update(lora_down=self.lora_down[...], lora_up=self.lora_up[...], lora_scale=self.lora_scale[...])
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.act_clip.ndim != 1:
            raise ValueError(
                f"QLinear {self.path!r} is stacked (tables {tuple(self.act_clip.shape)}); it runs per block "
                "inside the model's scan (or index one layer out of the stacked state first)"
            )
        b = current_bin()
        if b is None:
            if self.config.nbins != 1:
                raise ValueError(
                    f"QLinear {self.path!r} has {self.config.nbins} timestep bins but no bin is active: call "
                    "the model inside `with wanjax.quant.qlinear.active_bin(index):`"
                )
            b = 0
        a = self.arrays()
        return qlinear_apply(
            self.config,
            a,
            x,
            a["act_clip"][b],
            a["act_exp_offset"][b],
            None if a["act_scale"] is None else a["act_scale"][b],
            dtype=self.dtype,
            mode=self.mode,
        )


def set_lora(q: QLinear, down, up, scale) -> None:
    """Set (or replace) the run-time LoRA rank of ``q`` in place: ``down [..., K, R]`` (already transformed for the
    layer's smoothing / rotation: the branch sees ``x_r``, see ``wanjax.lora.fold_down``), ``up [..., R, N]`` and
    ``scale [..., R]`` (float32, per rank column: strength x alpha / rank), with the layer's leading axes (the
    stacked L). The forward then runs the low-rank branch with ``[down | lora_down]`` and
    ``[up ; scale * lora_up]``. The quantized arrays are not touched, so :func:`clear_lora` restores the exact
    layer. ``R = 0`` is allowed (same module structure as a layer with a LoRA, no effect)."""
    k, n = q.in_features, q.out_features
    lead = tuple(q.act_clip.shape[:-1])
    down, up, scale = jnp.asarray(down), jnp.asarray(up), jnp.asarray(scale, jnp.float32)
    r = down.shape[-1] if down.ndim else -1
    want = {"lora_down": lead + (k, r), "lora_up": lead + (r, n), "lora_scale": lead + (r,)}
    for name, arr in (("lora_down", down), ("lora_up", up), ("lora_scale", scale)):
        if tuple(arr.shape) != want[name]:
            raise ValueError(
                f"set_lora: QLinear {q.path!r}: {name} must have shape {want[name]}, got {tuple(arr.shape)}"
            )
    # nnx.data: the attributes are None (static) until a LoRA is set
    q.lora_down = nnx.data(LoraVar(down))
    q.lora_up = nnx.data(LoraVar(up))
    q.lora_scale = nnx.data(LoraVar(scale))


def clear_lora(q: QLinear) -> None:
    """Remove the run-time LoRA of ``q`` (the layer is then exactly as quantized, same graph definition)."""
    # nnx.static: back to plain (static) None attributes, as a layer never given a LoRA has
    q.lora_down = nnx.static(None)
    q.lora_up = nnx.static(None)
    q.lora_scale = nnx.static(None)


def _lowrank_with_lora(a: dict):
    """``(down, up)`` of the forward's low-rank branch: the layer's own, with a set LoRA's rank appended (its
    ``lora_scale`` folded into the up rows). None, None when the layer has neither."""
    down, up = a.get("down"), a.get("up")
    ld = a.get("lora_down")
    if ld is None:
        return down, up
    lu = a["lora_up"].astype(jnp.float32) * a["lora_scale"].astype(jnp.float32)[:, None]
    dt = down.dtype if down is not None else jnp.bfloat16
    ld, lu = ld.astype(dt), lu.astype(dt)
    if down is None:
        return ld, lu
    return jnp.concatenate([down, ld], axis=-1), jnp.concatenate([up, lu], axis=0)


def _dequant_weight(c: QLinearConfig, a: dict) -> jax.Array:
    qt = formats.QuantizedTensor(
        codes=a["qweight"],
        scales=a["wscale"],
        tensor_scale=a["wtensor_scale"],
        fmt=c.w_fmt,
        group_size=c.w_group,
        packed=c.packed,
    )
    return formats.dequantize(qt, jnp.float32)  # [N, K]


def act_qdq(c: QLinearConfig, x: jax.Array, clip, exp_offset, static_scale) -> jax.Array:
    """Activation fake quantization of ``x [M, K]`` (float32) with one bin's table entries (may be traced):
    ``c.act_spec.qdq``, with the static scale when ``c.act_mode == "static"``."""
    spec = c.act_spec
    if spec is None:
        return x
    if c.act_mode == "static":
        if static_scale is None:
            raise ValueError("QLinear: act_mode='static' needs the bin's static activation scale (act_scale)")
        return spec.qdq(x, static_scale=static_scale)
    return spec.qdq(x, clip=clip, exp_offset=exp_offset)


def _dot(a, b, dtype):
    return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _as_compute_dtype(x: jax.Array, dtype) -> jax.Array:
    """The input as a ``dtype`` Linear sees it: rounded to a 16-bit compute dtype (bf16), as the BF16 model's matmul
    operands are; unchanged for a float32 compute dtype. Both modes quantize this value, so fake and real agree, and
    in real mode the kernels read 2 bytes per element instead of 4 (the producer fusion writes bf16)."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(dtype).itemsize < x.dtype.itemsize:
        return x.astype(dtype)
    return x


def carried_weights(c: QLinearConfig, a: dict) -> tuple[jax.Array, jax.Array]:
    """The per-channel int8 GEMM's weight operands of a layer in a two-level config: ``(w [N, K] or packed [N, K/2],
    row scales f32 [N])``. Two-level weights: carried int8 ``q * m`` (from ``kweight`` if prepared) with ``wunit``;
    per-channel int4 weights: their codes with ``wscale``."""
    if a.get("kweight") is not None:
        return a["kweight"], a["kscale"]
    if c.w_scale_levels is None:
        return a["qweight"], a["wscale"][:, 0]
    codes = formats.QuantizedTensor(codes=a["qweight"], scales=a["wscale"], fmt="int4", packed=True).unpack().codes
    return carried_from_scales(codes, a["wscale"], a["wunit"], c.w_group), a["wunit"].astype(jnp.float32)


def _two_level_real(c: QLinearConfig, a: dict, x2: jax.Array, clip, static_scale, dtype) -> jax.Array:
    """Real mode of a two-level layer on ``x2 [M, K]``: the per-channel int8 GEMM (``dispatch.w4a4_matmul``) on
    carried int8 weights and, with ``a_scale_levels``, carried int8 activation codes from the XLA quantizer
    (``dispatch.act_quant_two_level``); per-token INT4 / INT8 activations go through ``dispatch.w4a4_linear``."""
    from wanjax.kernels import dispatch

    w, s_w = carried_weights(c, a)
    lowrank = dict(down=a.get("down"), up=a.get("up"), bias=a.get("bias"))
    if c.a_scale_levels is None:
        return dispatch.w4a4_linear(
            x2,
            w,
            s_w,
            smooth=a.get("smooth"),
            clip=clip,
            static_scale=static_scale,
            out_dtype=dtype,
            rot_signs=a.get("rot_signs"),
            rot_block=c.rot_block,
            a_qmax=INT_QMAX[c.a_fmt],
            **lowrank,
        )
    q, s, x_lr = dispatch.act_quant_two_level(
        x2,
        a.get("smooth"),
        lowrank["down"],
        clip,
        group_size=c.a_group,
        levels=c.a_scale_levels,
        rot_signs=a.get("rot_signs"),
        rot_block=c.rot_block,
    )
    up = lowrank["up"] if x_lr is not None else None
    return dispatch.w4a4_matmul(q, s, w, s_w, x_lr, up, lowrank["bias"], out_dtype=dtype, a_qmax=INT_QMAX["int8"])


def qlinear_apply(
    c: QLinearConfig,
    a: dict,
    x: jax.Array,
    clip,
    exp_offset=0,
    static_scale=None,
    *,
    dtype=jnp.bfloat16,
    mode: str = "fake",
    return_inexact: bool = False,
):
    """The QLinear forward as a pure function of its config, arrays ``a`` (one layer, no leading L) and one bin's
    table entries; ``x [..., K]`` -> ``[..., N]`` in ``dtype``. Used by :class:`QLinear` and the clip search.

    ``return_inexact=True`` returns ``(y, inexact_rows)``: for real-mode MXFP4 on the GPU kernel, the number of
    activation plus weight rows its FP8 re-encoding rounded (``kernels.dispatch.mxfp4_matmul``; with ``kweight`` the
    activation rows only, the weight rows were counted by ``prepare_kernel_weights``); 0 otherwise."""
    k = c.in_features
    if x.shape[-1] != k:
        raise ValueError(f"QLinear: input last dim must be in_features={k}, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = _as_compute_dtype(x.reshape(-1, k), dtype)
    smooth, signs = a.get("smooth"), a.get("rot_signs")
    if a.get("lora_down") is not None:
        down, up = _lowrank_with_lora(a)
        a = {**a, "down": down, "up": up}
    if mode == "real":
        from wanjax.kernels import dispatch

        if c.real_mode_problem():
            raise ValueError(f"QLinear: mode='real' unavailable: {c.real_mode_problem()}")
        inexact = jnp.int32(0)
        if c.two_level:
            y = _two_level_real(c, a, x2, clip, static_scale if c.act_mode == "static" else None, dtype)
        elif c.w_fmt == "mxfp4":
            if (
                signs is not None
            ):  # rotation after the smoothing, as an XLA pass; the MXFP4 kernels see the rotated input
                x2 = rotate_activations_mxu(
                    x2.astype(jnp.float32) / (1.0 if smooth is None else smooth), signs, c.rot_block
                )
                smooth = None
            mx = dict(
                smooth=smooth,
                down=a.get("down"),
                up=a.get("up"),
                bias=a.get("bias"),
                clip=clip,
                exp_offset=exp_offset,
                scale_rule=c.a_scale_rule,
                out_dtype=dtype,
                return_inexact=True,
            )
            if (
                a.get("kweight") is not None
            ):  # prepared at load time: no per-call re-encoding (weight rows counted then)
                y, inexact = dispatch.mxfp4_linear_fp8(x2, a["kweight"], a["kscale"], **mx)
            else:
                y, inexact = dispatch.mxfp4_linear(x2, a["qweight"], a["wscale"], **mx)
        else:
            group = None if c.w_group == k else c.w_group  # per channel, or int4 g128 (the group-scaled GEMM)
            # int4 codes are packed uint8 [N, K/2] (or prepared int8 kweight); int8 codes are int8 [N, K] already
            if a.get("kweight") is not None:  # int4 codes unpacked to int8 once at load time
                w, wscale = a["kweight"], a["kscale"]
            else:
                w, wscale = a["qweight"], (a["wscale"][:, 0] if group is None else a["wscale"])
            y = dispatch.w4a4_linear(
                x2,
                w,
                wscale,
                smooth=smooth,
                down=a.get("down"),
                up=a.get("up"),
                bias=a.get("bias"),
                clip=clip,
                static_scale=static_scale if c.act_mode == "static" else None,
                out_dtype=dtype,
                group_size=group,
                rot_signs=signs,
                rot_block=c.rot_block,
                a_qmax=INT_QMAX[c.a_fmt],
                w_qmax=INT_QMAX[c.w_fmt],  # 127: INT8 weights (int8 [N, K] codes, a mixed-precision recipe's layers)
                parts=c.parts if a.get("lora_down") is None else 1,  # a LoRA's up is not block-diagonal
            )
        y = y.reshape(*lead, c.out_features)
        return (y, inexact) if return_inexact else y
    xr = x2.astype(jnp.float32)
    if smooth is not None:
        xr = xr / smooth.astype(jnp.float32)
    if signs is not None:  # the run-time numerics of the rotation (the kernels'), not the float32 transform
        xr = rotate_activations_mxu(xr, signs, c.rot_block)
    xq = act_qdq(c, xr, clip, exp_offset, static_scale)
    y = _dot(xq, _dequant_weight(c, a).T, dtype)
    if a.get("down") is not None:
        x_lr = _dot(xr, a["down"], dtype).astype(dtype)  # as the kernels: x_lr rounded to the compute dtype
        y = y + _dot(x_lr, a["up"], dtype)
    if a.get("bias") is not None:
        y = y + a["bias"].astype(jnp.float32)
    y = y.astype(dtype).reshape(*lead, c.out_features)
    return (y, jnp.int32(0)) if return_inexact else y
