"""Recipes: named lists of transforms with their settings.

A :class:`Recipe` fixes the number formats (weights, activations, dynamic or static activation scales) and a list
of transforms applied to every quantized layer, in order:

* weight transforms (``params, LayerContext -> params``, pure): :class:`Smooth`, :class:`Rotate`, :class:`LowRank`,
  then exactly one quantizer, :class:`GPTQ` or :class:`RTN`;
* refit transforms (``params, LayerContext, residual -> params``): :class:`LowRankRefit` (the low-rank branch refit
  to the quantized residual's error);
* table transforms (``arrays -> arrays`` on the packed layer): :class:`ClipSearch` (per-bin activation clip /
  MX exponent offset / static scale).

Write your own by listing transforms (``docs/QUANTIZATION.md``)::

    my = Recipe("my", weight=WeightQuantSpec("int4"), act=ActQuantSpec("int4"),
                transforms=(Smooth(alpha=0.6), LowRank(rank=32), GPTQ(), ClipSearch()))

Named recipes (:func:`get_recipe`): ``rtn``, ``w8a8``, ``smoothquant``, ``quarot``, ``svdquant``, ``seed``, ``binned``,
``default``. The transforms only describe WHAT to do; ``wanjax.quant.quantize`` runs them with the calibration
statistics.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.quant.gptq import gptq
from wanjax.quant.linalg import hessian_from_rows
from wanjax.quant.lowrank import LOWRANK_METHODS, lowrank
from wanjax.quant.refit import REFIT_TARGETS, refit_lowrank
from wanjax.numerics.hadamard import rotate_activations
from wanjax.numerics.two_level import MAX_SCALE_LEVELS
from wanjax.quant.rotate import rotate, rotate_hessian
from wanjax.quant.rtn import ActQuantSpec, WeightQuantSpec, rtn
from wanjax.quant.smooth import DEFAULT_ALPHAS, smooth, smooth_hessian, smooth_search

__all__ = [
    "GPTQ",
    "RECIPES",
    "RTN",
    "ClipSearch",
    "LayerContext",
    "LowRank",
    "LowRankRefit",
    "Recipe",
    "Rotate",
    "Smooth",
    "exact_lowrank",
    "get_recipe",
    "layer_input",
    "rotation_block",
    "recipe_from_dict",
    "recipe_to_dict",
]

#: Attention settings a recipe may carry (None: the default backend).
RECIPE_ATTENTION = (None, "cudnn_fp8", "attn8", "auto8")
#: Calibration policies: each expert from its own statistics, or both from the pooled statistics.
RECIPE_CALIBRATION = ("per_expert", "shared")

#: The seed's activation clip grid and MX exponent offsets (15 candidates for MXFP4).
SEED_CLIPS = (0.6, 0.7, 0.8, 0.9, 1.0)
SEED_EXP_OFFSETS = (-1, 0, 1)


@dataclasses.dataclass
class LayerContext:
    """What a transform may use for one layer of one expert.

    Attributes:
      path: layer path (``"blocks.ffn.fc1"``); index: block index; expert: expert name.
      absmax: ``[B, K]`` per-bin channel abs-max of the raw layer input.
      rows: ``[B, n, K]`` sampled raw input rows per bin.
      hessian: ``[K, K]`` sum of ``x^T x`` over the raw inputs (all bins), or None.
      recipe: the running :class:`Recipe`.
    """

    path: str
    index: int
    expert: str
    absmax: Any
    rows: Any
    hessian: Any
    recipe: "Recipe"

    @property
    def all_rows(self):
        """Rows of all bins, ``[B * n, K]``."""
        r = jnp.asarray(self.rows, jnp.float32)
        return r.reshape(-1, r.shape[-1])


def layer_input(params: dict, x, rot_block: int | None = None):
    """What the quantized matmul sees for raw input ``x [..., K]``: ``rotate(x / smooth)`` (each if present;
    ``rot_block``: the Hadamard block, see :func:`rotation_block`)."""
    x = jnp.asarray(x, jnp.float32)
    if "smooth" in params:
        x = x / params["smooth"]
    if "rot_signs" in params:
        x = rotate_activations(x, params["rot_signs"], rot_block)
    return x


def rotation_block(recipe: "Recipe") -> int | None:
    """The Hadamard block size of the recipe's :class:`Rotate` (None: none, or the largest power of two dividing K)."""
    return next((t.block_size for t in recipe.transforms if isinstance(t, Rotate)), None)


def _path_ranks(ranks, owner: str) -> tuple:
    """Validated ``((regex, rank), ...)`` per-path rank overrides (lists from JSON become tuples)."""
    out = []
    for item in ranks:
        if len(item) != 2 or not isinstance(item[0], str) or int(item[1]) < 0:
            raise ValueError(f"{owner}: ranks must be (regex, rank >= 0) pairs, got {item!r}")
        re.compile(item[0])
        out.append((item[0], int(item[1])))
    return tuple(out)


def _check_lowrank_fields(obj, method_field: str, ranks_field: str) -> None:
    """``__post_init__`` of a transform with a low-rank step: its method field must name one of `LOWRANK_METHODS`;
    its per-path ranks field is validated and stored as tuples (errors name the transform's class)."""
    owner, method = type(obj).__name__, getattr(obj, method_field)
    if method not in LOWRANK_METHODS:
        raise ValueError(f"{owner}: {method_field} must be one of {LOWRANK_METHODS}, got {method!r}")
    object.__setattr__(obj, ranks_field, _path_ranks(getattr(obj, ranks_field), owner))


def rank_for(path: str, rank: int, ranks: tuple) -> int:
    """The rank of layer ``path``: the first ``(regex, rank)`` of ``ranks`` whose regex matches it, else ``rank``."""
    return next((r for pat, r in ranks if re.search(pat, path)), rank)


# ------------------------------------------------------------------------------------------------ weight transforms
@dataclasses.dataclass(frozen=True)
class Smooth:
    """SmoothQuant smoothing ``s = a^alpha / w^(1-alpha)`` from the abs-max over all bins of the expert.

    ``alpha`` fixed, or ``search=True``: per layer over ``alphas`` by the quantized layer's output error on the
    sampled rows (with a low-rank branch of ``search_rank`` in the loop, computed by ``lowrank_method``: ``"svd"``
    exact or ``"randomized"``, see ``wanjax.quant.lowrank``; ``search_ranks``: per-path overrides as ``LowRank.ranks``).
    """

    alpha: float = 0.5
    search: bool = False
    alphas: tuple = DEFAULT_ALPHAS
    search_rank: int = 0
    lowrank_method: str = "svd"
    search_ranks: tuple = ()
    stage = "weight"

    def __post_init__(self):
        _check_lowrank_fields(self, "lowrank_method", "search_ranks")

    def __call__(self, params: dict, ctx: LayerContext) -> dict:
        a = jnp.max(jnp.asarray(ctx.absmax, jnp.float32), axis=0)
        if not self.search:
            return smooth(params, a, self.alpha)
        out, _ = smooth_search(
            params,
            a,
            ctx.all_rows,
            ctx.recipe.weight,
            ctx.recipe.act_spec(),
            alphas=self.alphas,
            rank=rank_for(ctx.path, self.search_rank, self.search_ranks),
            lowrank_method=self.lowrank_method,
        )
        return out


@dataclasses.dataclass(frozen=True)
class Rotate:
    """Block Hadamard rotation of the input (QuaRot); random signs from ``seed`` (None: no signs); ``block_size``:
    the largest Hadamard block (a power of two; each layer uses the largest power of two dividing its K, capped by
    it; None: no cap, 1024 at K = 5120 and 512 at K = 13824). The fused GPU act-quant kernel rotates in-kernel for
    blocks of 64-1024 (``kernels.dispatch.act_quant``)."""

    seed: int | None = 0
    block_size: int | None = None
    stage = "weight"

    def __call__(self, params: dict, ctx: LayerContext) -> dict:
        if self.seed is None:
            return rotate(params, None, self.block_size)
        tag = int(np.frombuffer(ctx.path.encode(), np.uint8).astype(np.int64).sum()) * 1000 + ctx.index
        return rotate(params, jax.random.fold_in(jax.random.key(self.seed), tag), self.block_size)


@dataclasses.dataclass(frozen=True)
class LowRank:
    """SVDQuant low-rank branch of rank ``rank`` (16-bit ``down``/``up``), taken on the smoothed/rotated weight;
    ``method``: ``"svd"`` (exact thin SVD, the seed's) or ``"randomized"`` (subspace iteration: a few matmuls instead
    of a full SVD, the fast choice for 5120 x 13824 kernels; see ``wanjax.quant.lowrank``). ``ranks``: per-path
    overrides ``((regex, rank), ...)``, the first regex found in the layer path (e.g. ``"ffn\\.fc[12]"``) wins."""

    rank: int = 32
    method: str = "svd"
    ranks: tuple = ()
    stage = "weight"

    def __post_init__(self):
        _check_lowrank_fields(self, "method", "ranks")

    def __call__(self, params: dict, ctx: LayerContext) -> dict:
        k, n = params["kernel"].shape
        r = rank_for(ctx.path, self.rank, self.ranks)
        if r == 0:
            return params
        return lowrank(params, min(r, k, n), jnp.bfloat16, method=self.method)


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """GPTQ of the (residual) weight.

    ``hessian="quantized"``: from the sampled rows as the layer sees them, fake-quantized with the recipe's
    activation quantizer at clip 1 (the seed's choice, here on the sampled rows rather than all tokens);
    ``"raw"``: the captured ``X^T X`` of the raw inputs transformed by the smoothing / rotation (falls back to the
    rows without quantization when no Hessian was captured); ``"captured"``: the captured Hessian used as is (when
    calibration already applied the smoothing + activation QDQ through its ``hessian_transform``: the seed's
    all-token Hessian).
    ``balance_bins=True`` (rows-based Hessians only): each bin's rows are scaled to unit mean square before the sum,
    so every timestep bin weighs the same in the reconstruction objective (otherwise the high-energy bins dominate).
    """

    hessian: str = "quantized"
    balance_bins: bool = False
    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = True
    weight_clips: tuple[float, ...] = ()
    weight_clip_metric: str = "diag"
    stage = "quantizer"

    def __post_init__(self):
        if self.hessian not in ("quantized", "raw", "captured"):
            raise ValueError(f"GPTQ: hessian must be 'quantized', 'raw' or 'captured', got {self.hessian!r}")
        if self.weight_clip_metric not in ("diag", "hessian"):
            raise ValueError(f"GPTQ: weight_clip_metric must be 'diag' or 'hessian', got {self.weight_clip_metric!r}")

    def layer_hessian(self, params: dict, ctx: LayerContext):
        """The Hessian of the inputs the quantized matmul sees, ``[K, K]``."""
        if self.hessian == "captured":
            if ctx.hessian is None:
                raise ValueError(
                    f"GPTQ(hessian='captured'): no Hessian was captured for {ctx.expert} {ctx.path}[{ctx.index}]"
                )
            return jnp.asarray(ctx.hessian, jnp.float32)
        if self.hessian == "raw" and ctx.hessian is not None:
            h = jnp.asarray(ctx.hessian, jnp.float32)
            if "smooth" in params:
                h = smooth_hessian(h, params["smooth"])
            if "rot_signs" in params:
                h = rotate_hessian(h, params["rot_signs"], rotation_block(ctx.recipe))
            return h
        spec = ctx.recipe.act_spec() if self.hessian == "quantized" else None
        x = layer_input(params, ctx.rows, rotation_block(ctx.recipe))  # [B, n, K]
        if self.balance_bins:
            x = x * jax.lax.rsqrt(jnp.maximum(jnp.mean(x * x, axis=(1, 2), keepdims=True), 1e-30))
        h, _ = hessian_from_rows(x, None, spec)
        return h

    def __call__(self, params: dict, ctx: LayerContext) -> dict:
        return gptq(
            params,
            self.layer_hessian(params, ctx),
            ctx.recipe.weight,
            block_size=self.block_size,
            percdamp=self.percdamp,
            act_order=self.act_order,
            static_groups=self.static_groups,
            weight_clips=self.weight_clips,
            weight_clip_metric=self.weight_clip_metric,
        )


@dataclasses.dataclass(frozen=True)
class RTN:
    """Round-to-nearest weight quantization."""

    stage = "quantizer"

    def __call__(self, params: dict, ctx: LayerContext) -> dict:
        return rtn(params, ctx.recipe.weight)


@dataclasses.dataclass(frozen=True)
class LowRankRefit:
    """Refits the low-rank branch after the quantizer to what the quantized residual misses on the calibration rows
    (``wanjax.quant.refit``): ``target="output"`` fits the weight and activation quantization error of the 4-bit path,
    ``"weight"`` the weight error only; ``balance_bins`` weighs every timestep bin alike (as GPTQ's option). Runs after
    the quantizer (it is called with the residual the quantizer was given); the branch keeps its shape and dtype."""

    target: str = "output"
    percdamp: float = 0.01
    balance_bins: bool = True
    stage = "refit"

    def __post_init__(self):
        if self.target not in REFIT_TARGETS:
            raise ValueError(f"LowRankRefit: target must be one of {REFIT_TARGETS}, got {self.target!r}")

    def __call__(self, params: dict, ctx: LayerContext, residual) -> dict:
        x = layer_input(params, ctx.rows, rotation_block(ctx.recipe))  # [B, n, K]
        if self.balance_bins:
            x = x * jax.lax.rsqrt(jnp.maximum(jnp.mean(x * x, axis=(1, 2), keepdims=True), 1e-30))
        out, _ = refit_lowrank(
            params,
            residual,
            x.reshape(-1, x.shape[-1]),
            ctx.recipe.act_spec(),
            target=self.target,
            percdamp=self.percdamp,
        )
        return out


# ------------------------------------------------------------------------------------------------- table transforms
@dataclasses.dataclass(frozen=True)
class ClipSearch:
    """Activation table search (``wanjax.quant.search``): per (layer, bin) the candidate minimizing the relative
    layer-output error on the sampled rows against the unquantized layer.

    Attributes:
      clips: clip ratios (dynamic mode: multiplies the per-token abs-max; static: the per-bin abs-max scale).
      exp_offsets: MX exponent offsets (mxfp4 activations only; int formats use 0).
      per_bin: one table entry per bin (True) or one shared by all bins (False: "one clip").
      skip: regex of layer paths left at the default (clip 1, offset 0), e.g. ``"cross_attn"`` as the seed.
    """

    clips: tuple = SEED_CLIPS
    exp_offsets: tuple = SEED_EXP_OFFSETS
    per_bin: bool = True
    skip: str | None = None
    stage = "table"

    def applies_to(self, path: str) -> bool:
        """Whether the search runs for layer ``path``."""
        return self.skip is None or re.search(self.skip, path) is None


# ------------------------------------------------------------------------------------------------------- recipes
_TRANSFORMS = {c.__name__: c for c in (Smooth, Rotate, LowRank, GPTQ, RTN, LowRankRefit, ClipSearch)}
_STAGES = {"weight": 0, "quantizer": 1, "refit": 2, "table": 3}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A quantization recipe: formats + ordered transforms.

    Attributes:
      name: recipe name.
      weight: weight quantizer (``WeightQuantSpec``).
      act: activation quantizer (``ActQuantSpec``: format, group, MX scale rule; clip/offset come from the per-bin
        tables) or None for weight-only.
      act_mode: ``"dynamic"`` (per-token abs-max x clip[bin]) or ``"static"`` (per-bin scale, int formats).
      transforms: weight transforms, then one quantizer (GPTQ / RTN), then refit transforms (LowRankRefit), then
        table transforms.
      notes: free text (where the settings come from).
      attention: optional attention backend to run the quantized experts with (``"cudnn_fp8"``: cuDNN FP8 flash
        attention; ``"attn8"``: the 8-bit attention everywhere; ``"auto8"``: attn8 on Hopper where it is faster, the
        automatic backend elsewhere; see `wanjax.model.attention`); None keeps the default (bf16 cuDNN on GPU).
        Applied by ``attach_artifact``.
      calibration: ``"per_expert"`` (each expert quantized from its own activation statistics, the seed's policy) or
        ``"shared"`` (both from the two experts' pooled statistics; ``wanjax.quant.quantize.SharedExpertSource``).
      fuse_qkv: calibrate the self-attention q, k and v as one group (`wanjax.quant.fuse`): one joint smoothing
        vector (the shared input's abs-max, the max over the three weights), one rotation, one activation table,
        so their activation quantizations are identical; stored and run as ONE quantized linear ``K -> 3 dim``
        (``blocks.self_attn.qkv``) whose output the block splits. Its :class:`Smooth` and :class:`Rotate` run on the
        concatenated kernel; the other transforms (low-rank branch, quantizer, refit) per part.
      weight_overrides: ``((regex, WeightQuantSpec), ...)``: layers whose path matches a regex (the first that
        matches wins; ``re.search`` on e.g. ``"blocks.ffn.fc2"``) take that weight format instead of ``weight``
        (mixed precision, e.g. INT8 weights for one sensitive layer type); :meth:`for_path` gives a layer's recipe.
    """

    name: str
    weight: WeightQuantSpec
    act: ActQuantSpec | None
    transforms: tuple
    act_mode: str = "dynamic"
    notes: str = ""
    attention: str | None = None
    calibration: str = "per_expert"
    fuse_qkv: bool = False
    weight_overrides: tuple = ()

    def __post_init__(self):
        stages = [getattr(t, "stage", None) for t in self.transforms]
        if any(s not in _STAGES for s in stages):
            bad = [type(t).__name__ for t, s in zip(self.transforms, stages) if s not in _STAGES]
            raise ValueError(
                f"Recipe {self.name!r}: unknown transforms {bad}; expected instances of {sorted(_TRANSFORMS)}"
            )
        if stages.count("quantizer") != 1:
            raise ValueError(
                f"Recipe {self.name!r}: needs exactly one weight quantizer (GPTQ or RTN), got "
                f"{stages.count('quantizer')} in {[type(t).__name__ for t in self.transforms]}"
            )
        order = [_STAGES[s] for s in stages]
        if order != sorted(order):
            raise ValueError(
                f"Recipe {self.name!r}: order must be weight transforms, then the quantizer, then refit and table "
                f"transforms; got {[type(t).__name__ for t in self.transforms]}"
            )
        if self.act_mode not in ("dynamic", "static"):
            raise ValueError(f"Recipe {self.name!r}: act_mode must be 'dynamic' or 'static', got {self.act_mode!r}")
        if self.calibration not in RECIPE_CALIBRATION:
            raise ValueError(
                f"Recipe {self.name!r}: calibration must be one of {RECIPE_CALIBRATION}, got {self.calibration!r}"
            )
        if self.attention not in RECIPE_ATTENTION:
            raise ValueError(
                f"Recipe {self.name!r}: attention must be one of {RECIPE_ATTENTION}, got {self.attention!r}"
            )
        if not isinstance(self.fuse_qkv, bool):
            raise ValueError(f"Recipe {self.name!r}: fuse_qkv must be True or False, got {self.fuse_qkv!r}")
        for item in self.weight_overrides:
            ok = isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], WeightQuantSpec)
            if not ok or not isinstance(item[0], str):
                raise ValueError(
                    f"Recipe {self.name!r}: weight_overrides must be ((regex, WeightQuantSpec), ...), got {item!r}"
                )
            try:
                re.compile(item[0])
            except re.error as e:
                raise ValueError(f"Recipe {self.name!r}: weight_overrides regex {item[0]!r} is invalid: {e}") from e

    def for_path(self, path: str) -> Recipe:
        """This recipe as layer ``path`` gets it: the first matching ``weight_overrides`` entry's weight format in
        place of ``weight`` (and no overrides left), or the recipe itself."""
        for pattern, spec in self.weight_overrides:
            if re.search(pattern, path):
                return dataclasses.replace(self, weight=spec, weight_overrides=())
        return self

    def act_spec(self) -> ActQuantSpec | None:
        """The activation quantizer at clip 1 / offset 0 (used for quantized-input Hessians and alpha search)."""
        return None if self.act is None else dataclasses.replace(self.act, clip=1.0, exp_offset=0)

    def stage(self, name: str) -> tuple:
        """The transforms of stage ``name`` (``"weight"``, ``"quantizer"``, ``"refit"``, ``"table"``)."""
        return tuple(t for t in self.transforms if t.stage == name)


def exact_lowrank(r: Recipe, name: str | None = None) -> Recipe:
    """``r`` with every low-rank step (the :class:`LowRank` branch and the :class:`Smooth` search's in-loop branch)
    computed by the exact SVD instead of the randomized one; named ``name`` (default: ``r``'s name)."""
    ts = tuple(
        dataclasses.replace(t, method="svd")
        if isinstance(t, LowRank)
        else dataclasses.replace(t, lowrank_method="svd")
        if isinstance(t, Smooth)
        else t
        for t in r.transforms
    )
    return dataclasses.replace(r, name=r.name if name is None else name, transforms=ts)


def _spec_dict(spec) -> dict:
    """A weight / activation spec as a dict; ``scale_levels`` only when set, so recipes without two-level scales
    keep the dicts written before the option existed."""
    d = dataclasses.asdict(spec)
    if d.get("scale_levels") is None:
        d.pop("scale_levels", None)
    return d


def recipe_to_dict(r: Recipe) -> dict:
    """JSON-friendly form of a recipe (stored in artifacts). ``fuse_qkv`` is written only when set, so the dicts of
    recipes without it are those written before the option existed (work dirs and artifacts compare them)."""
    out = {
        "name": r.name,
        "act_mode": r.act_mode,
        "notes": r.notes,
        "attention": r.attention,
        "calibration": r.calibration,
        "weight": _spec_dict(r.weight),
        "act": None if r.act is None else _spec_dict(r.act),
        "transforms": [
            {
                "type": type(t).__name__,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(t).items()},
            }
            for t in r.transforms
        ],
    }
    if r.fuse_qkv:
        out["fuse_qkv"] = True
    if r.weight_overrides:
        out["weight_overrides"] = [[pattern, _spec_dict(spec)] for pattern, spec in r.weight_overrides]
    return out


def recipe_from_dict(d: dict) -> Recipe:
    """Inverse of :func:`recipe_to_dict`."""
    ts = []
    for t in d["transforms"]:
        t = dict(t)
        cls = _TRANSFORMS.get(t.pop("type"))
        if cls is None:
            raise ValueError(f"recipe {d.get('name')!r}: unknown transform type; expected one of {sorted(_TRANSFORMS)}")
        ts.append(cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in t.items()}))
    return Recipe(
        name=d["name"],
        weight=WeightQuantSpec(**d["weight"]),
        act=None if d["act"] is None else ActQuantSpec(**d["act"]),
        transforms=tuple(ts),
        act_mode=d.get("act_mode", "dynamic"),
        notes=d.get("notes", ""),
        attention=d.get("attention"),
        calibration=d.get("calibration", "per_expert"),
        fuse_qkv=d.get("fuse_qkv", False),
        weight_overrides=tuple((p, WeightQuantSpec(**w)) for p, w in d.get("weight_overrides", ())),
    )


_INT4 = WeightQuantSpec("int4")
_A_INT4 = ActQuantSpec("int4")
#: Finer clip grid for int4 per-token activations (a clip acts continuously there, unlike MX power-of-two scales).
#: Alpha grid of the default recipe's smoothing search (6 SVD-in-the-loop evaluations per layer).
DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: Per-channel weight clip grid of GPTQ's optional scale search (``GPTQ(weight_clips=...)``).
WEIGHT_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
#: Largest Hadamard block of the default recipe's rotation (the largest power of two dividing K, up to this).
DEFAULT_ROT_BLOCK = 256
INT_CLIPS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def _default_transforms(gptq: GPTQ | None = None, lowrank: LowRank | None = None) -> tuple:
    """The default recipe's transforms (smoothing 0.5, block rotation, rank-32 randomized branch, GPTQ with the
    quantized-input Hessian, one clip per layer), with ``gptq`` / ``lowrank`` in place of its own when given."""
    return (
        Smooth(0.5),
        Rotate(0, DEFAULT_ROT_BLOCK),
        lowrank or LowRank(32, method="randomized"),
        gptq or GPTQ(hessian="quantized"),
        ClipSearch(INT_CLIPS, (0,), per_bin=False),
    )


_W4A8 = Recipe(
    "w4a8",
    _INT4,
    ActQuantSpec("int8"),
    _default_transforms(GPTQ(hessian="quantized", weight_clips=WEIGHT_CLIPS)),
    calibration="shared",
    attention="auto8",
    notes="the default with INT8 per-token activations (W4A8): same INT4 weights and memory, same "
    "transforms, plus GPTQ's per-channel weight clip search (the 4-bit weights are W4A8's larger error: +1.2 dB "
    "on the mini model over three calibration draws). On Hopper it runs on the same int8 tensor-core GEMM as "
    "W4A4 (Hopper has no 4-bit tensor cores), so the 8-bit activations cost no GEMM time there; about +5.8 dB "
    "over the default on the mini model (docs/QUALITY.md). On TPU v5e/v6e and Blackwell, 4-bit activations have "
    "the faster 4-bit paths: pick the default there. Attention 'auto8' as in the default (a 0.21 dB cost on the "
    "mini model, 8 clips: bench.attn8_quality --recipe w4a8).",
)


RECIPES: dict[str, Recipe] = {
    "rtn": Recipe(
        "rtn",
        _INT4,
        _A_INT4,
        (RTN(),),
        notes="INT4 per-channel weights, INT4 per-token activations, round to nearest, clip 1.",
    ),
    "w8a8": Recipe(
        "w8a8",
        WeightQuantSpec("int8"),
        ActQuantSpec("int8"),
        (RTN(),),
        notes="INT8 per-channel weights, INT8 per-token activations, RTN (reference point).",
    ),
    "smoothquant": Recipe(
        "smoothquant",
        WeightQuantSpec("int8"),
        ActQuantSpec("int8"),
        (Smooth(0.5), RTN()),
        notes="SmoothQuant W8A8: alpha 0.5, INT8 per-channel / per-token, RTN.",
    ),
    "quarot": Recipe(
        "quarot",
        _INT4,
        _A_INT4,
        (Rotate(0), GPTQ(hessian="raw")),
        notes="QuaRot: random-sign block Hadamard on every layer input, GPTQ, INT4 W/A per channel / per token.",
    ),
    "svdquant": Recipe(
        "svdquant",
        _INT4,
        _A_INT4,
        (Smooth(0.5), LowRank(32), RTN(), ClipSearch(INT_CLIPS, (0,), per_bin=False)),
        notes="SVDQuant: smoothing alpha 0.5, rank-32 bf16 branch, RTN of the residual, one clip "
        "per layer (shared by all bins); INT4 per channel / per token.",
    ),
    "seed": Recipe(
        "seed",
        WeightQuantSpec("mxfp4", scale_rule="ocp_floor"),
        ActQuantSpec("mxfp4", scale_rule="safe_ceil"),
        (
            Smooth(0.5),
            LowRank(16),
            GPTQ(hessian="quantized"),
            ClipSearch(SEED_CLIPS, SEED_EXP_OFFSETS, per_bin=True, skip="cross_attn"),
        ),
        notes="arXiv 2605.27003 code defaults: MXFP4 W (ocp_floor) / A (safe_ceil), smoothing alpha 0.5, "
        "rank 16, GPTQ with the quantized-input Hessian (block 128, damp 0.01, no act-order, "
        "static group scales), per-expert per-bin clip x exponent-offset search (15 candidates), "
        "cross-attention unsearched.",
    ),
    "binned": Recipe(
        "binned",
        _INT4,
        _A_INT4,
        (
            Smooth(search=True, alphas=DEFAULT_ALPHA_GRID, search_rank=32, lowrank_method="randomized"),
            LowRank(32, method="randomized"),
            GPTQ(hessian="quantized", balance_bins=True),
            ClipSearch(INT_CLIPS, (0,)),
        ),
        notes="the seed's per-expert, per-timestep-bin policy on the default's INT4 path: each expert "
        "calibrated on its own activations, GPTQ with the timestep bins balanced, a clip searched "
        "per timestep bin on every layer. For models whose experts or timesteps differ in their "
        "activation ranges; on the mini model none of the three earns the 0.3 dB the default's "
        "components must earn (docs/QUALITY.md).",
    ),
    "default": Recipe(
        "default",
        _INT4,
        _A_INT4,
        _default_transforms(),
        calibration="shared",
        attention="auto8",
        notes="ours: INT4 per-channel weights + INT4 per-token activations (the fast GPU kernel "
        "path), smoothing alpha 0.5, a random-sign block Hadamard rotation of the smoothed input "
        "(blocks of up to 256; rotated inside the fused act-quant kernel), bf16 rank-32 "
        "low-rank branch on the rotated input (randomized subspace iteration), GPTQ with the "
        "quantized-input Hessian, one activation clip per layer searched over all timesteps, both "
        "experts calibrated on their pooled activations. Each kept component earns >= 0.3 dB PSNR "
        "on the mini model (docs/QUALITY.md); per-bin clips, per-expert calibration and GPTQ's "
        "timestep-bin balancing did not (they are in the recipe 'binned'), nor did the per-layer "
        "alpha search once the rotation was in (it is in 'fast'). Attention 'auto8': the 8-bit attention "
        "on Hopper at 480p, where it is faster than cuDNN BF16 (a 0.07 dB cost on the mini model, 0.3 % "
        "rel-L2 on a full-size BF16 forward).",
    ),
    "w4a8": _W4A8,
    "w4a8_mixed": dataclasses.replace(
        _W4A8,
        name="w4a8_mixed",
        weight_overrides=((r"self_attn\.", WeightQuantSpec("int8")),),
        notes="w4a8 with INT8 per-channel weights for the self-attention q / k / v / o (mixed precision, "
        "weight_overrides): the best of the four layer types tried on the mini model (docs/QUALITY.md). On Hopper "
        "the 8-bit weights run on the same int8 tensor-core GEMM (no GEMM time), at 1 byte a parameter for those "
        "layers: about 30 % more weight memory at full size (4 x 5120^2 of the 351 M parameters of a block).",
    ),
    "w4a4_g64": Recipe(
        "w4a4_g64",
        WeightQuantSpec("int4", group_size=64, scale_levels=MAX_SCALE_LEVELS),
        ActQuantSpec("int4", group_size=64, scale_levels=MAX_SCALE_LEVELS),
        _default_transforms(lowrank=LowRank(64, method="randomized")),
        calibration="shared",
        attention="auto8",
        notes="the best true W4A4 (4-bit weights and activations): the default with INT4 weights and activations "
        "in groups of 64 along K, their scales two-level integers (a float unit per channel / token times an "
        "integer <= 18 per group, so the per-channel int8 GEMM computes the group-scaled product exactly on "
        "carried codes), and a rank-64 low-rank branch: 40.4 dB, +2.4 over the default, on the mini model over three "
        "calibration draws (docs/QUALITY.md). Costs on a GPU: the rank-64 branch (14-17 % a linear, H200), the "
        "two-level activation quantizer in XLA (not yet the fused kernel) and the carried int8 [N, K] weight codes "
        "(twice packed INT4's memory once prepared). For quality with 4-bit activations, "
        "i.e. where 4-bit compute pays (TPU v5e / v6e, Blackwell); on Hopper w4a8 / w4a8_mixed are faster and "
        "better.",
    ),
    "g128": Recipe(
        "g128",
        WeightQuantSpec("int4", group_size=128),
        _A_INT4,
        _default_transforms(),
        calibration="shared",
        notes="the default with INT4 weights in groups of 128 along K (one scale per output channel and group) "
        "and INT4 per-token activations: finer weight scales at the same bits (+1/16 bit a weight for the "
        "scales); real mode runs the group-scaled GEMM (kernels/w4a4_g128_gpu.py), slower than per channel "
        "on Hopper today (docs/BENCHMARKS.md).",
    ),
    "fast": Recipe(
        "fast",
        _INT4,
        _A_INT4,
        (
            Smooth(search=True, alphas=DEFAULT_ALPHA_GRID, search_rank=32, lowrank_method="randomized"),
            LowRank(32, method="randomized"),
            GPTQ(hessian="quantized"),
            ClipSearch(INT_CLIPS, (0,), per_bin=False),
        ),
        calibration="shared",
        notes="the default before the rotation: smoothing with alpha searched per layer "
        "(rank-32 branch in the loop), rank-32 branch, GPTQ with the quantized-input Hessian, one "
        "clip per layer, both experts from pooled statistics. The act quant does not rotate, so "
        "the linears run faster on the GPU, at 1.3 dB less PSNR than the default on the mini model "
        "(docs/QUALITY.md).",
    ),
}


#: the recipe name the command line's ``--recipe auto`` (its default) picks by hardware
AUTO = "auto"


def auto_recipe() -> tuple[str, str]:
    """``(name, why)``: the recipe to use on this machine's default device (docs/QUANTIZATION.md, "Which recipe on
    which hardware"). On Hopper ``w4a8_mixed``: INT8 activations and the self-attention's INT8 weights run on the same
    int8 tensor-core GEMM as INT4 ones (Hopper has no 4-bit tensor cores; docs/BENCHMARKS.md), for +7.3 dB over the
    W4A4 default on the mini model (docs/QUALITY.md) at about 30 % more weight memory than 4-bit weights everywhere
    (``w4a8``); elsewhere ``default`` (W4A4: TPU v5e / v6e have a native int4 MXU mode)."""
    from wanjax.kernels.dispatch import on_hopper

    if on_hopper():
        return "w4a8_mixed", (
            "Hopper GPU: INT8 activations and INT8 self-attention weights cost no GEMM time on its int8 tensor cores "
            "(no 4-bit ones) and gain quality; --recipe w4a8 for 4-bit weights everywhere (30 % less weight memory), "
            "--recipe default for W4A4"
        )
    return "default", "not a Hopper GPU: W4A4 (4-bit activations pay on TPU v5e/v6e and Blackwell)"


def get_recipe(name_or_recipe) -> Recipe:
    """A named recipe (``RECIPES``) or a :class:`Recipe` passed through; ``KeyError`` lists the names."""
    if isinstance(name_or_recipe, Recipe):
        return name_or_recipe
    if name_or_recipe not in RECIPES:
        raise KeyError(f"unknown recipe {name_or_recipe!r}; expected one of {sorted(RECIPES)} or a Recipe")
    return RECIPES[name_or_recipe]
