"""Parameter names of one Wan2.2 DiT expert: official <-> diffusers <-> wanjax.

Three naming schemes exist for the same tensors (reference: wan22_architecture.md sections 2.2-2.5):

* **official** (``Wan-Video/Wan2.2`` ``WanModel``): ``blocks.0.self_attn.q.weight``, ``blocks.0.modulation``,
  ``head.head.weight`` ... PyTorch layouts (Linear ``[out, in]``, Conv3d ``[O, I, T, H, W]``).
  ComfyUI single files prefix these keys with ``model.diffusion_model.``.
* **diffusers** (``WanTransformer3DModel``): ``blocks.0.attn1.to_q.weight``, ``blocks.0.scale_shift_table``,
  ``proj_out.weight`` ...; the official ``norm3`` (affine LayerNorm before cross-attention) is named ``norm2``
  there and the (parameter-free) official ``norm2`` is ``norm3``.
* **wanjax**: the pure-dict path of `WanDiT`'s ``nnx.Param`` state, with the blocks stacked on a leading axis
  (``("blocks", "self_attn", "q", "kernel")`` of shape ``[L, in, out]``) and JAX layouts (kernel ``[in, out]``).

Everything here is a pure function of names and shapes; no tensors are read.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from wanjax.config import WanConfig
from wanjax.io.errors import CheckpointError
from wanjax.model.names import BLOCK_LINEAR_NAMES

COMFY_PREFIX = "model.diffusion_model."

Path = tuple[str, ...]

# ---- official <-> diffusers --------------------------------------------------------------------------------------
# Module-name renames (official module -> diffusers module). Applied to the module part of a key (everything before
# the final ".weight"/".bias"), as whole dotted components, never as raw substrings.
_TOP_RENAMES: dict[str, str] = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
# Whole top-level parameters (no .weight/.bias suffix).
_TOP_PARAM_RENAMES: dict[str, str] = {"head.modulation": "scale_shift_table"}

# Inside ``blocks.N.``: module renames.
_BLOCK_RENAMES: dict[str, str] = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    # The official code calls the norms in the order norm1, norm3, norm2; diffusers renumbers them.
    "norm1": "norm1",
    "norm3": "norm2",
    "norm2": "norm3",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_PARAM_RENAMES: dict[str, str] = {"modulation": "scale_shift_table"}

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_SUFFIXES = (".weight", ".bias")


def _invert(d: dict[str, str]) -> dict[str, str]:
    inv = {v: k for k, v in d.items()}
    assert len(inv) == len(d), "rename table is not a bijection"
    return inv


_TOP_RENAMES_INV = _invert(_TOP_RENAMES)
_TOP_PARAM_RENAMES_INV = _invert(_TOP_PARAM_RENAMES)
_BLOCK_RENAMES_INV = _invert(_BLOCK_RENAMES)
_BLOCK_PARAM_RENAMES_INV = _invert(_BLOCK_PARAM_RENAMES)


def _rename(
    key: str, top: dict[str, str], top_param: dict[str, str], block: dict[str, str], block_param: dict[str, str]
) -> str | None:
    m = _BLOCK_RE.match(key)
    if m:
        prefix, rest = f"blocks.{m.group(1)}.", m.group(2)
        mods, params = block, block_param
    else:
        prefix, rest = "", key
        mods, params = top, top_param
    if rest in params:
        return prefix + params[rest]
    for suffix in _SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if module in mods:
                return prefix + mods[module] + suffix
    return None


def official_to_diffusers(key: str) -> str:
    """Official key -> diffusers key, e.g. ``blocks.3.norm3.weight`` -> ``blocks.3.norm2.weight``.

    Raises ``KeyError`` naming the key when it is not a Wan2.2 DiT parameter.
    """
    out = _rename(key, _TOP_RENAMES, _TOP_PARAM_RENAMES, _BLOCK_RENAMES, _BLOCK_PARAM_RENAMES)
    if out is None:
        raise KeyError(f"{key!r} is not an official Wan2.2 DiT parameter name")
    return out


def diffusers_to_official(key: str) -> str:
    """Diffusers key -> official key (inverse of `official_to_diffusers`); ``KeyError`` if unknown."""
    out = _rename(key, _TOP_RENAMES_INV, _TOP_PARAM_RENAMES_INV, _BLOCK_RENAMES_INV, _BLOCK_PARAM_RENAMES_INV)
    if out is None:
        raise KeyError(f"{key!r} is not a diffusers WanTransformer3DModel parameter name")
    return out


def strip_comfy_prefix(key: str) -> str:
    """Remove the ComfyUI ``model.diffusion_model.`` prefix if present."""
    return key[len(COMFY_PREFIX) :] if key.startswith(COMFY_PREFIX) else key


# ---- layout detection --------------------------------------------------------------------------------------------
_DIFFUSERS_MARKERS = ("condition_embedder.", "proj_out.", "scale_shift_table", ".attn1.", ".attn2.", ".ffn.net.")
_OFFICIAL_MARKERS = (
    "text_embedding.",
    "time_embedding.",
    "time_projection.",
    "head.",
    ".self_attn.",
    ".cross_attn.",
    ".modulation",
    ".ffn.0.",
    ".ffn.2.",
)


def detect_layout(keys, source: str = "<checkpoint>") -> tuple[str, bool]:
    """Return ``(layout, comfy_prefixed)`` with layout ``"official"`` or ``"diffusers"``.

    ``comfy_prefixed`` is True when every key carries the ComfyUI ``model.diffusion_model.`` prefix. Raises
    `CheckpointError` (a ``ValueError``, naming ``source``) for a mix of prefixed and unprefixed keys, a mix of
    official and diffusers names, or no recognisable Wan DiT key at all.
    """
    keys = list(keys)
    if not keys:
        raise CheckpointError(f"{source}: the checkpoint holds no tensors")
    prefixed = [k.startswith(COMFY_PREFIX) for k in keys]
    if any(prefixed) and not all(prefixed):
        bad = [k for k, p in zip(keys, prefixed) if not p][:5]
        raise CheckpointError(
            f"{source}: some keys carry the ComfyUI prefix {COMFY_PREFIX!r} and some do not (e.g. unprefixed: {bad})"
        )
    comfy = all(prefixed)
    names = [strip_comfy_prefix(k) for k in keys]
    dotted = ["." + k for k in names]
    n_diff = sum(any(m in k for m in _DIFFUSERS_MARKERS) for k in dotted)
    n_off = sum(any(m in k for m in _OFFICIAL_MARKERS) for k in dotted)
    if n_diff and n_off:
        raise CheckpointError(
            f"{source}: keys mix the official layout ({n_off} keys like "
            f"'blocks.N.self_attn.q.weight') and the diffusers layout ({n_diff} keys like "
            "'blocks.N.attn1.to_q.weight')"
        )
    if not n_diff and not n_off:
        raise CheckpointError(
            f"{source}: no Wan2.2 DiT key found (first keys: {names[:5]}); expected official keys "
            "like 'blocks.0.self_attn.q.weight' or diffusers keys like "
            "'blocks.0.attn1.to_q.weight'"
        )
    return ("diffusers" if n_diff else "official"), comfy


def is_dit_key(key: str) -> bool:
    """Whether ``key`` names a Wan2.2 DiT parameter in any layout (official, diffusers, with or without the ComfyUI
    prefix); used to tell a stray second checkpoint from an unrelated file."""
    name = strip_comfy_prefix(key)
    for fn in (official_to_diffusers, diffusers_to_official):
        try:
            fn(name)
            return True
        except KeyError:
            pass
    return False


def to_official(key: str, layout: str, comfy: bool) -> str | None:
    """Map an on-disk key of the given layout to its official name; None when it is not a DiT parameter."""
    if comfy:
        key = strip_comfy_prefix(key)
    if layout == "official":
        try:
            official_to_diffusers(key)  # validates the name
        except KeyError:
            return None
        return key
    try:
        return diffusers_to_official(key)
    except KeyError:
        return None


# ---- expected official keys and shapes ---------------------------------------------------------------------------
def official_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the official ``WanModel`` state dict with its PyTorch shape, in module order."""
    d, f, L = cfg.dim, cfg.ffn_dim, cfg.num_layers
    pt, ph, pw = cfg.patch_size
    s: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.in_dim, pt, ph, pw),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    for i in range(L):
        b = f"blocks.{i}."
        s[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                s[f"{b}{attn}.{p}.weight"] = (d, d)
                s[f"{b}{attn}.{p}.bias"] = (d,)
            s[f"{b}{attn}.norm_q.weight"] = (d,)
            s[f"{b}{attn}.norm_k.weight"] = (d,)
        s[b + "norm3.weight"] = (d,)
        s[b + "norm3.bias"] = (d,)
        s[b + "ffn.0.weight"] = (f, d)
        s[b + "ffn.0.bias"] = (f,)
        s[b + "ffn.2.weight"] = (d, f)
        s[b + "ffn.2.bias"] = (d,)
    s["head.head.weight"] = (cfg.out_dim * pt * ph * pw, d)
    s["head.head.bias"] = (cfg.out_dim * pt * ph * pw,)
    s["head.modulation"] = (1, 2, d)
    return s


# ---- official -> wanjax ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    """Where an official tensor goes in the wanjax tree.

    path: pure-dict path of the `WanDiT` parameter. layer: block index (row of the stacked leaf) or None.
    kind: ``"linear"`` (transpose [out, in] -> [in, out]), ``"patch"`` (Conv3d -> dense patch kernel),
    ``"copy"`` (unchanged; a block modulation [1, 6, dim] fills one row of [L, 1, 6, dim]).
    """

    path: Path
    layer: int | None
    kind: str


_TOP_MODULES: dict[str, Path] = {
    "text_embedding.0": ("text_embedding", "fc1"),
    "text_embedding.2": ("text_embedding", "fc2"),
    "time_embedding.0": ("time_embedding", "fc1"),
    "time_embedding.2": ("time_embedding", "fc2"),
    "time_projection.1": ("time_projection",),
    "head.head": ("head", "head"),
}
#: Official module names of the block Linears whose wanjax name differs (the FFN is an nn.Sequential there).
_OFFICIAL_BLOCK_NAMES = {"ffn.fc1": "ffn.0", "ffn.fc2": "ffn.2"}
#: official module name inside a block -> path of the `BLOCK_LINEARS` layer inside the block
_BLOCK_LINEARS: dict[str, Path] = {_OFFICIAL_BLOCK_NAMES.get(n, n): tuple(n.split(".")) for n in BLOCK_LINEAR_NAMES}
_BLOCK_NORMS: dict[str, Path] = {
    **{f"{a}.{n}": (a, n) for a in ("self_attn", "cross_attn") for n in ("norm_q", "norm_k")},
    "norm3": ("norm3",),
}


def official_to_wanjax(key: str) -> Target:
    """Official key -> `Target` in the wanjax parameter tree; ``KeyError`` naming the key if unknown."""
    if key == "patch_embedding.weight":
        return Target(("patch_embedding", "kernel"), None, "patch")
    if key == "patch_embedding.bias":
        return Target(("patch_embedding", "bias"), None, "copy")
    if key == "head.modulation":
        return Target(("head", "modulation"), None, "copy")
    m = _BLOCK_RE.match(key)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest == "modulation":
            return Target(("blocks", "modulation"), layer, "copy")
        module, _, leaf = rest.rpartition(".")
        if module in _BLOCK_LINEARS and leaf in ("weight", "bias"):
            return Target(
                ("blocks",) + _BLOCK_LINEARS[module] + ("kernel" if leaf == "weight" else "bias",),
                layer,
                "linear" if leaf == "weight" else "copy",
            )
        if module in _BLOCK_NORMS and (leaf == "weight" or (module == "norm3" and leaf == "bias")):
            return Target(
                ("blocks",) + _BLOCK_NORMS[module] + ("scale" if leaf == "weight" else "bias",), layer, "copy"
            )
    else:
        module, _, leaf = key.rpartition(".")
        if module in _TOP_MODULES and leaf in ("weight", "bias"):
            return Target(
                _TOP_MODULES[module] + ("kernel" if leaf == "weight" else "bias",),
                None,
                "linear" if leaf == "weight" else "copy",
            )
    raise KeyError(f"{key!r} has no place in the wanjax WanDiT parameter tree")


def converted_shape(kind: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one tensor after `convert_tensor` (per layer, before stacking)."""
    if kind == "linear":
        return (torch_shape[1], torch_shape[0])
    if kind == "patch":
        return (math.prod(torch_shape[1:]), torch_shape[0])
    return tuple(torch_shape)


def convert_tensor(kind: str, w: np.ndarray) -> np.ndarray:
    """PyTorch layout -> wanjax layout (a view when possible; no dtype change).

    ``patch``: Conv3d weight [O, C, pt, ph, pw] -> [(pt*ph*pw)*C, O] with rows ordered (pt, ph, pw, c), i.e.
    ``kernel[(ph*2 + pw)*C + c, o] = w[o, c, 0, ph, pw]`` for the (1, 2, 2) patch.
    """
    if kind == "linear":
        return w.T
    if kind == "patch":
        return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])
    return w


def wanjax_shapes(cfg: WanConfig) -> dict[Path, tuple[int, ...]]:
    """Flat ``{path: shape}`` of the wanjax parameter tree implied by `official_shapes` (blocks stacked)."""
    out: dict[Path, tuple[int, ...]] = {}
    for key, shape in official_shapes(cfg).items():
        t = official_to_wanjax(key)
        s = converted_shape(t.kind, shape)
        out[t.path] = (cfg.num_layers,) + s if t.layer is not None else s
    return out
