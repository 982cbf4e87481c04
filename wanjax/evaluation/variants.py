"""What ``wanjax eval`` compares: the named recipes and the ablations of the ``default`` recipe, as `Variant`s.

`REMOVALS` / `ADDITIONS` say which ablations remove a component the default keeps and which add back one it dropped
(the report's targets, `wanjax.evaluation.report.targets`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

__all__ = ["ABLATIONS", "ADDITIONS", "REMOVALS", "Variant", "ablation_variants", "plan_variants", "recipe_variants"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """A quantization run: recipe (its ``calibration`` says per-expert or pooled statistics) + which bins
    (``"seed"``: 3 per expert; ``"6"``: 6 per expert, or the smaller expert's step count if that is less: both
    experts need the same count)."""

    name: str
    recipe: Any
    bins: str = "seed"
    group: str = "recipe"
    what: str = ""


#: ``w4a8_w8<tag>`` ablations: (tag, layer-path regex, what) of the layers given INT8 weights (``weight_overrides``)
MIXED_W8 = (
    ("fc2", r"ffn\.fc2", "ffn.fc2"),
    ("fc1", r"ffn\.fc1", "ffn.fc1"),
    ("self", r"self_attn\.", "the self-attention q / k / v / o"),
    ("cross", r"cross_attn\.", "the cross-attention q / k / v / o"),
    ("attn", r"(self|cross)_attn\.", "every attention projection (self and cross)"),
)


def recipe_variants(names: Sequence[str]) -> list[Variant]:
    """One variant per named recipe (``wanjax.quant.recipes.RECIPES``)."""
    from wanjax.quant.recipes import get_recipe

    return [Variant(n, get_recipe(n), what=get_recipe(n).notes) for n in names]


def _swap(recipe, cls, new):
    return tuple(new if isinstance(t, cls) else t for t in recipe.transforms)


def ablation_variants(names: Sequence[str] | None = None) -> list[Variant]:
    """Ablations of the ``default`` recipe (all of `ABLATIONS`, or those named)."""
    from wanjax.quant.recipes import (
        DEFAULT_ALPHA_GRID,
        GPTQ,
        INT_CLIPS,
        RTN,
        SEED_CLIPS,
        SEED_EXP_OFFSETS,
        WEIGHT_CLIPS,
        ClipSearch,
        LowRank,
        LowRankRefit,
        Rotate,
        Smooth,
        get_recipe,
    )
    from wanjax.numerics.two_level import MAX_SCALE_LEVELS as LEVELS
    from wanjax.quant.rtn import ActQuantSpec, WeightQuantSpec

    d = get_recipe("default")
    cs = next(t for t in d.transforms if isinstance(t, ClipSearch))
    gq = next(t for t in d.transforms if isinstance(t, GPTQ))
    R = dataclasses.replace
    w8 = get_recipe("w4a8")
    w8gq = next(t for t in w8.transforms if isinstance(t, GPTQ))
    w8lr = next(t for t in w8.transforms if isinstance(t, LowRank))

    def w8v(name, *new):
        """Recipe 'w4a8' renamed, each transform of ``new`` replacing w4a8's transform of its class."""
        ts = w8.transforms
        for t in new:
            ts = _swap(R(w8, transforms=ts), type(t), t)
        return R(w8, name=name, transforms=ts)

    def rank(r):
        ts = tuple(t for t in d.transforms if not isinstance(t, LowRank)) if r == 0 else _swap(d, LowRank, LowRank(r))
        ts = tuple(R(t, search_rank=r) if isinstance(t, Smooth) else t for t in ts)
        return R(d, name=f"default-rank{r}", transforms=ts)

    def path_ranks(tag, ranks):
        ts = tuple(
            R(t, ranks=ranks) if isinstance(t, LowRank) else R(t, search_ranks=ranks) if isinstance(t, Smooth) else t
            for t in d.transforms
        )
        return R(d, name=f"default-rank-{tag}", transforms=ts)

    def rotated(block):
        return R(
            d,
            name="default-rotate-" + ("max" if block is None else f"b{block}"),
            transforms=_swap(d, Rotate, Rotate(0, block)),
        )

    def refit(t):
        ts = [x for x in d.transforms if not isinstance(x, LowRankRefit)]
        i = next(j for j, x in enumerate(ts) if isinstance(x, ClipSearch))
        return R(d, name=f"default-refit-{t.target}", transforms=tuple(ts[:i] + [t] + ts[i:]))

    def fmt(name, w, a, clip):
        return R(d, name=name, weight=w, act=a, transforms=_swap(d, ClipSearch, clip))

    def two_level(g):  # INT4 W/A in groups of g with two-level integer scales on both sides
        spec = dict(group_size=g, scale_levels=LEVELS)
        return fmt(f"default-g{g}l", WeightQuantSpec("int4", **spec), ActQuantSpec("int4", **spec), cs)

    binned = get_recipe("binned")
    table = {
        # removal of a kept component
        "no_lowrank": (rank(0), "seed", "no low-rank branch (rank 0)"),
        "no_rotation": (
            R(d, name="default-norot", transforms=tuple(t for t in d.transforms if not isinstance(t, Rotate))),
            "seed",
            "no Hadamard rotation (smoothing alpha 0.5, rank-32 branch, GPTQ, one clip)",
        ),
        "no_gptq": (R(d, name="default-rtn", transforms=_swap(d, GPTQ, RTN())), "seed", "RTN instead of GPTQ"),
        "no_smoothing": (
            R(d, name="default-nosmooth", transforms=tuple(t for t in d.transforms if not isinstance(t, Smooth))),
            "seed",
            "no smoothing at all (the rotation, low-rank branch and GPTQ on the raw input)",
        ),
        # what a component dropped from the default would add back
        "per_expert_calib": (
            R(d, name="default-per-expert", calibration="per_expert"),
            "seed",
            "each expert calibrated on its own activations (the seed's per-expert policy)",
        ),
        "bin_balance": (
            R(d, name="default-bin-balance", transforms=_swap(d, GPTQ, R(gq, balance_bins=True))),
            "seed",
            "GPTQ with the 3 timestep bins per expert weighted alike (bins balanced)",
        ),
        "per_bin_clips": (
            binned,
            "seed",
            "recipe 'binned': per-expert calibration, GPTQ bins balanced and a clip "
            "searched per timestep bin, 3 bins per expert",
        ),
        "per_bin_clips_bins6": (binned, "6", "recipe 'binned' with 6 bins per expert"),
        # other choices
        "gptq_act_order": (
            R(d, name="default-actorder", transforms=_swap(d, GPTQ, R(gq, act_order=True))),
            "seed",
            "GPTQ with act-order (input channels by descending Hessian diagonal)",
        ),
        "gptq_wclip": (
            R(d, name="default-wclip", transforms=_swap(d, GPTQ, R(gq, weight_clips=WEIGHT_CLIPS))),
            "seed",
            "GPTQ with a per-channel weight clip searched (diag(H)-weighted RTN error)",
        ),
        "exact_svd": (
            R(
                d,
                name="default-svd",
                transforms=tuple(
                    R(t, method="svd")
                    if isinstance(t, LowRank)
                    else R(t, lowrank_method="svd")
                    if isinstance(t, Smooth)
                    else t
                    for t in d.transforms
                ),
            ),
            "seed",
            "low-rank branch (and the alpha search's) by exact SVD instead of randomized subspace iteration",
        ),
        "lowrank_refit": (
            refit(LowRankRefit()),
            "seed",
            "low-rank branch refit after GPTQ to the 4-bit "
            "path's output error on the calibration rows (weight + activation quantization)",
        ),
        "lowrank_refit_weight": (
            refit(LowRankRefit(target="weight")),
            "seed",
            "low-rank branch refit after GPTQ to the weight quantization error only",
        ),
        "rank_ffn64_attn16": (
            path_ranks("ffn64-attn16", RANK_FFN64_ATTN16),
            "seed",
            "rank 64 on ffn.fc1/fc2 and 16 on the 8 attention projections: the rank-32 budget "
            "sum r (K + N) moved to the FFN (equal on the mini model, 97 % of it at full size)",
        ),
        "rank_ffn96_attn0": (
            path_ranks("ffn96-attn0", RANK_FFN96_ATTN0),
            "seed",
            "rank 96 on ffn.fc1/fc2 and no branch on the attention projections: the whole rank-32 "
            "budget in the FFN (equal on the mini model, 95 % of it at full size)",
        ),
        "alpha_search": (
            R(
                d,
                name="default-alpha-search",
                transforms=_swap(
                    d,
                    Smooth,
                    Smooth(search=True, alphas=DEFAULT_ALPHA_GRID, search_rank=32, lowrank_method="randomized"),
                ),
            ),
            "seed",
            "smoothing alpha searched per layer (rank-32 branch in the loop; the former default) instead of 0.5",
        ),
        "fast": (get_recipe("fast"), "seed", "recipe 'fast' (the former default): alpha searched, no rotation"),
        "rotate_max": (
            rotated(None),
            "seed",
            "rotation blocks as large as K allows (the largest power of two "
            "dividing K: 1024 / 512 at full size; 256 on the mini model, as the "
            "default)",
        ),
        "rotate_b128": (rotated(128), "seed", "rotation in Hadamard blocks of 128 (the default's: up to 256)"),
        "rotate_b64": (rotated(64), "seed", "rotation in Hadamard blocks of 64"),
        "rank16": (rank(16), "seed", "rank 16"),
        "rank64": (rank(64), "seed", "rank 64"),
        "int4_g64": (
            fmt("default-g64", WeightQuantSpec("int4", group_size=64), ActQuantSpec("int4", group_size=64), cs),
            "seed",
            "INT4 W/A in groups of 64",
        ),
        "mxfp4": (
            fmt(
                "default-mxfp4",
                WeightQuantSpec("mxfp4", scale_rule="ocp_floor"),
                ActQuantSpec("mxfp4", scale_rule="safe_ceil"),
                ClipSearch(SEED_CLIPS, SEED_EXP_OFFSETS),
            ),
            "seed",
            "MXFP4 W/A (seed scale rules, clip x exponent-offset search)",
        ),
        "nvfp4": (
            fmt("default-nvfp4", WeightQuantSpec("nvfp4"), ActQuantSpec("nvfp4"), ClipSearch(INT_CLIPS, (0,))),
            "seed",
            "NVFP4 W/A",
        ),
        "w4a8": (
            fmt("default-w4a8", d.weight, ActQuantSpec("int8"), cs),
            "seed",
            "INT8 per-token activations, INT4 weights (what the 4-bit activations cost)",
        ),
        "w8a4": (
            fmt("default-w8a4", WeightQuantSpec("int8"), d.act, cs),
            "seed",
            "INT8 per-channel weights, INT4 activations (what the 4-bit weights cost)",
        ),
        "fuse_qkv": (
            R(d, name="default-fuse-qkv", fuse_qkv=True),
            "seed",
            "self-attention q/k/v calibrated as one group and run as ONE fused linear: one joint smoothing vector, "
            "rotation and activation quantization shared by the three (recipe option fuse_qkv)",
        ),
        "w4a8_g128": (
            fmt("w4a8-g128", WeightQuantSpec("int4", group_size=128), ActQuantSpec("int8"), cs),
            "seed",
            "INT4 weights in groups of 128 along K with INT8 per-token activations (issue 35's combination of "
            "the two levers; its reference is the recipe w4a8)",
        ),
        "w4a8_g64": (
            fmt("w4a8-g64", WeightQuantSpec("int4", group_size=64), ActQuantSpec("int8"), cs),
            "seed",
            "INT4 weights in groups of 64 with INT8 per-token activations",
        ),
        "w4a8_wclip_g128l": (
            R(w8, name="w4a8-wclip-g128l", weight=WeightQuantSpec("int4", group_size=128, scale_levels=LEVELS)),
            "seed",
            "recipe 'w4a8' (weight clip search included) with two-level integer group scales on the weights: "
            f"groups of 128, each scale an integer multiple (<= {LEVELS}) of one unit per channel, run exactly by the "
            "per-channel int8 GEMM (compare w4a8_g128: float32 group scales, slower GEMM)",
        ),
        "w4a8_wclip_g64l": (
            R(w8, name="w4a8-wclip-g64l", weight=WeightQuantSpec("int4", group_size=64, scale_levels=LEVELS)),
            "seed",
            "as w4a8_wclip_g128l in groups of 64 (compare w4a8_g64)",
        ),
        "w4a8_g128l": (
            fmt("w4a8-g128l", WeightQuantSpec("int4", group_size=128, scale_levels=LEVELS), ActQuantSpec("int8"), cs),
            "seed",
            "w4a8_g128 with two-level integer weight scales instead of float32 ones (no weight clip search: the "
            "like-for-like pair of w4a8_g128)",
        ),
        "w4a8_g64l": (
            fmt("w4a8-g64l", WeightQuantSpec("int4", group_size=64, scale_levels=LEVELS), ActQuantSpec("int8"), cs),
            "seed",
            "w4a8_g64 with two-level integer weight scales (the like-for-like pair of w4a8_g64)",
        ),
        "int4_g128": (
            fmt("default-g128", WeightQuantSpec("int4", group_size=128), ActQuantSpec("int4", group_size=128), cs),
            "seed",
            "INT4 W/A in groups of 128 with float32 scales (the reference of g128l)",
        ),
        "g128l": (
            two_level(128),
            "seed",
            "INT4 W/A in groups of 128 with two-level integer scales (a unit per channel / token, an integer "
            f"multiple <= {LEVELS} per group): the per-channel int8 GEMM runs it exactly (compare int4_g128)",
        ),
        "g64l": (
            two_level(64),
            "seed",
            "as g128l in groups of 64 (compare int4_g64)",
        ),
        "g64l_rank64": (
            R(two_level(64), name="default-g64l-rank64", transforms=rank(64).transforms),
            "seed",
            "g64l with a rank-64 low-rank branch: the true W4A4 candidate for issue 35's 40 dB (two-level g64 "
            "runs on the per-channel GEMM; rank 64 costs 14-17 % a linear on the GPU)",
        ),
        **{
            f"w4a8_w8{tag}": (
                R(w8, name=f"w4a8-w8{tag}", weight_overrides=((pattern, WeightQuantSpec("int8")),)),
                "seed",
                f"recipe 'w4a8' with INT8 per-channel weights for {what} (mixed precision: the Hopper int8 GEMM "
                "runs 8-bit weights at the 4-bit ones' speed, at twice their memory for those layers)",
            )
            for tag, pattern, what in MIXED_W8
        },
        "w4a8_rank64": (
            w8v("w4a8-rank64", R(w8lr, rank=64)),
            "seed",
            "recipe 'w4a8' with a rank-64 low-rank branch (its reference is the recipe w4a8; since w4a8 took the "
            "weight clip search this equals w4a8_wclip_rank64)",
        ),
        "w4a8_alpha03": (
            w8v("w4a8-alpha0.3", Smooth(0.3)),
            "seed",
            "recipe 'w4a8' with smoothing alpha 0.3 instead of 0.5: less of the activations' range moved into the "
            "4-bit weights, more left to the 8-bit activations (its reference is the recipe w4a8)",
        ),
        "w4a8_alpha015": (
            w8v("w4a8-alpha0.15", Smooth(0.15)),
            "seed",
            "recipe 'w4a8' with smoothing alpha 0.15 (its reference is the recipe w4a8)",
        ),
        "w4a8_wclip": (
            w8v("w4a8-wclip", R(w8gq, weight_clips=WEIGHT_CLIPS)),
            "seed",
            "GPTQ's per-channel weight clip search on the recipe 'w4a8' (measured +1.2 dB over three draws on "
            "2026-12-07, after which the recipe took it: now the same as w4a8)",
        ),
        "w4a8_wclip_h": (
            w8v("w4a8-wclip-hessian", R(w8gq, weight_clips=WEIGHT_CLIPS, weight_clip_metric="hessian")),
            "seed",
            "recipe 'w4a8' with GPTQ's weight clip search measured by the full Hessian quadratic form d^T H d "
            "instead of diag(H) (its reference is the recipe w4a8)",
        ),
        "w4a8_wclip_fine": (
            w8v("w4a8-wclip-fine", R(w8gq, weight_clips=tuple(round(1.0 - 0.025 * i, 3) for i in range(17)))),
            "seed",
            "recipe 'w4a8' with GPTQ's weight clip search over a finer, wider grid (1.0 to 0.6 in steps of 0.025; "
            "its reference is the recipe w4a8)",
        ),
        "w4a8_wclip_rank64": (
            w8v("w4a8-wclip-rank64", R(w8lr, rank=64), R(w8gq, weight_clips=WEIGHT_CLIPS)),
            "seed",
            "recipe 'w4a8' with GPTQ's weight clip search and a rank-64 low-rank branch (its reference is the recipe "
            "w4a8)",
        ),
        "w4a8_fuse_qkv": (
            R(get_recipe("w4a8"), name="w4a8-fuse-qkv", fuse_qkv=True),
            "seed",
            "recipe 'w4a8' (not the default) with fuse_qkv: its reference is the recipe w4a8 (--recipes w4a8)",
        ),
        "static": (
            R(d, name="default-static", act_mode="static", transforms=_swap(d, ClipSearch, R(cs, per_bin=True))),
            "seed",
            "static per-bin activation scales (searched) instead of dynamic per-token",
        ),
    }
    names = list(ABLATIONS) if names is None else list(names)
    bad = [n for n in names if n not in table]
    if bad:
        raise KeyError(f"unknown ablations {bad}; expected some of {list(table)}")
    return [Variant(n, table[n][0], table[n][1], "ablation", table[n][2]) for n in names]


#: Per-path ranks of the ablations ``rank_ffn64_attn16`` and ``rank_ffn96_attn0`` (``LowRank.ranks``).
RANK_FFN64_ATTN16 = ((r"ffn\.fc[12]", 64), (r"attn\.", 16))
RANK_FFN96_ATTN0 = ((r"ffn\.fc[12]", 96), (r"attn\.", 0))

#: Ablation names, in report order.
ABLATIONS = (
    "no_lowrank",
    "no_gptq",
    "no_smoothing",
    "no_rotation",
    "alpha_search",
    "per_expert_calib",
    "bin_balance",
    "per_bin_clips",
    "per_bin_clips_bins6",
    "gptq_act_order",
    "gptq_wclip",
    "exact_svd",
    "lowrank_refit",
    "lowrank_refit_weight",
    "rank_ffn64_attn16",
    "rank_ffn96_attn0",
    "fast",
    "rotate_max",
    "rotate_b128",
    "rotate_b64",
    "rank16",
    "rank64",
    "int4_g64",
    "mxfp4",
    "nvfp4",
    "w4a8",
    "w8a4",
    "static",
    "fuse_qkv",
    "w4a8_fuse_qkv",
    "w4a8_g128",
    "w4a8_g64",
    "w4a8_rank64",
    "w4a8_alpha03",
    "w4a8_alpha015",
    "w4a8_wclip",
    "w4a8_wclip_rank64",
    "w4a8_wclip_h",
    "w4a8_wclip_fine",
    "w4a8_wclip_g128l",
    "w4a8_wclip_g64l",
    "w4a8_g128l",
    "w4a8_g64l",
    "int4_g128",
    "g128l",
    "g64l",
    "g64l_rank64",
    *(f"w4a8_w8{tag}" for tag, _, _ in MIXED_W8),
)
#: Ablations removing a component the default keeps (the issue's rule: each must cost >= 0.3 dB PSNR), and those
#: adding back a component it dropped.
REMOVALS = {
    "no_lowrank": "low-rank branch",
    "no_gptq": "GPTQ",
    "no_smoothing": "smoothing",
    "no_rotation": "Hadamard rotation",
}
ADDITIONS = {
    "alpha_search": "the per-layer alpha search",
    "per_expert_calib": "per-expert calibration",
    "bin_balance": "timestep bins (GPTQ bin balancing)",
    "per_bin_clips": "the seed's per-expert, per-bin policy (recipe binned)",
}


def plan_variants(recipes: Sequence[str], ablations: Sequence[str] | bool = False) -> list[Variant]:
    """The variants `run_eval` runs for ``recipes`` and ``ablations`` (``default`` added as the ablations'
    reference); unknown names raise ``KeyError`` listing the valid ones."""
    recipes = list(recipes)
    if ablations and "default" not in recipes:
        recipes.append("default")  # the reference of the ablations
    variants = recipe_variants(recipes)
    if ablations:
        variants += ablation_variants(None if ablations is True else ablations)
    return variants
