"""Reading LoRA files for a Wan2.2 DiT expert in the published key formats, and checking them against the model.

One LoRA of a Linear is ``down`` [r, K] and ``up`` [N, r] (PyTorch layout, the Linear's weight is [N, K]) and an
optional ``alpha``; its weight delta is ``strength * alpha / r * up @ down`` (``alpha`` absent: scale 1). Accepted:

* key prefixes: ``diffusion_model.`` (the Wan2.2-Lightning release, the official loader, ComfyUI, LightX2V),
  ``model.diffusion_model.``, ``transformer.`` (diffusers), ``base_model.model.`` (PEFT), ``lora_unet_`` /
  ``lora_unet__`` (kohya / musubi-tuner / ComfyUI, dots written as underscores), ``lora_transformer_``, or none;
* module names: official (``blocks.0.self_attn.q``, ``ffn.0``, ``head.head`` ...) or diffusers
  (``blocks.0.attn1.to_q``, ``ffn.net.0.proj``, ``proj_out`` ...), dotted or with underscores (kohya);
* tensor names: ``.lora_down.weight`` / ``.lora_up.weight``, ``.lora_A.weight`` / ``.lora_B.weight`` (also with
  ``.default``), ``.lora.down.weight`` / ``.lora.up.weight``, ``_lora.down.weight`` / ``_lora.up.weight``,
  ``.lora_linear_layer.down.weight`` / ``.up.weight``; ``.alpha``; bias deltas ``.diff_b`` and ``.lora_B.bias``;
  full deltas ``.diff`` (a Linear's weight, a norm's weight) and ``blocks.N.diff_m`` (the block modulation);
* ``alpha``: per module (``.alpha``), else the PEFT ``lora_adapter_metadata`` of the safetensors header
  (``lora_alpha`` / ``r``, as diffusers saves it), else none (scale 1);
* tensors in float32, float16 or bfloat16 (computed in float32).

Everything else is an error naming the file and the key: DoRA (``dora_scale``), LoCon mid weights, Wan2.1-I2V image
cross-attention (``k_img`` / ``v_img``: Wan2.2 has none), the patch embedding (a Conv3d), a module or block the
model lacks, a shape that does not fit, a ``down`` without its ``up``. Keys that name nothing known are listed in
one error unless ``ignore_unknown=True`` (then they are kept in ``LoraWeights.ignored`` and warned about).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Mapping

import numpy as np

from wanjax.config import TINY, WanConfig
from wanjax.io.keymap import official_shapes, official_to_diffusers

__all__ = [
    "LoraError",
    "LoraModule",
    "LoraWeights",
    "read_lora",
    "parse_lora",
    "official_module",
]


class LoraError(ValueError):
    """A LoRA file that cannot be used with the model; the message names the file, the key, expected and got.
    ``problems`` holds one line per problem when several were found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [message])


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """The LoRA of one Linear, by its official module name (``"blocks.3.self_attn.q"``, ``"head.head"``).

    ``down`` [r, K] and ``up`` [N, r] float32 (PyTorch layout), ``alpha`` (None: scale 1), ``keys``: the file's keys
    it came from (for messages)."""

    module: str
    down: np.ndarray
    up: np.ndarray
    alpha: float | None
    keys: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1 without alpha): the factor of ``up @ down`` at strength 1."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self) -> np.ndarray:
        """``scale * up @ down`` [N, K] float32 (the weight delta at strength 1, PyTorch layout)."""
        return self.scale * (self.up.astype(np.float32) @ self.down.astype(np.float32))


@dataclasses.dataclass
class LoraWeights:
    """A parsed LoRA file.

    Attributes:
      source: the file (or ``"<dict>"``).
      format: what the keys looked like, e.g. ``"official (diffusion_model., lora_down/lora_up, alpha)"``.
      modules: official module name -> `LoraModule`.
      diffs: official parameter name (``"blocks.0.norm3.weight"``, ``"blocks.0.self_attn.q.bias"``,
        ``"blocks.0.modulation"``) -> full delta float32 in the official shape (``.diff``, ``.diff_b``, ``diff_m``,
        ``.lora_B.bias``: added as ``strength * delta``; ``.lora_B.bias`` already times its module's scale).
      ignored: keys left out (``ignore_unknown=True``).
      name: a label (default: the file's base name).
    """

    source: str
    format: str
    modules: dict[str, LoraModule]
    diffs: dict[str, np.ndarray]
    ignored: tuple[str, ...] = ()
    name: str = ""

    @property
    def ranks(self) -> dict[str, int]:
        return {m: lm.rank for m, lm in self.modules.items()}

    def num_params(self) -> int:
        return sum(lm.down.size + lm.up.size for lm in self.modules.values()) + sum(d.size for d in self.diffs.values())

    def describe(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return (
            f"{self.name or self.source}: {self.format}; {len(self.modules)} LoRA modules (rank "
            f"{'/'.join(map(str, ranks)) or '-'}), {len(self.diffs)} full deltas"
            + (f", {len(self.ignored)} keys ignored" if self.ignored else "")
        )


# ------------------------------------------------------------------------------------------------ name tables
#: tensor-name suffix -> role (longest first when matching)
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    # (suffix, role, naming family for the format label)
    (".lora_linear_layer.down.weight", "down", "lora_linear_layer.down/up"),
    (".lora_linear_layer.up.weight", "up", "lora_linear_layer.down/up"),
    (".lora_A.default.weight", "down", "lora_A/lora_B"),
    (".lora_B.default.weight", "up", "lora_A/lora_B"),
    (".lora_down.weight", "down", "lora_down/lora_up"),
    (".lora_up.weight", "up", "lora_down/lora_up"),
    (".lora.down.weight", "down", "lora.down/lora.up"),
    (".lora.up.weight", "up", "lora.down/lora.up"),
    ("_lora.down.weight", "down", "_lora.down/_lora.up"),
    ("_lora.up.weight", "up", "_lora.down/_lora.up"),
    (".lora_A.weight", "down", "lora_A/lora_B"),
    (".lora_B.weight", "up", "lora_A/lora_B"),
    (".lora_B.bias", "up_bias", "lora_A/lora_B"),
    (".alpha", "alpha", ""),
    (".diff_b", "diff_b", ""),
    (".diff", "diff", ""),
)
#: key prefixes, longest first: (prefix, label, underscores instead of dots)
_PREFIXES: tuple[tuple[str, str, bool], ...] = (
    ("base_model.model.diffusion_model.", "PEFT base_model.model.diffusion_model.", False),
    ("base_model.model.", "PEFT base_model.model.", False),
    ("model.diffusion_model.", "model.diffusion_model.", False),
    ("diffusion_model.", "diffusion_model.", False),
    ("transformer.", "transformer.", False),
    ("lora_transformer_", "lora_transformer_", True),
    ("lora_unet__", "lora_unet__", True),
    ("lora_unet_", "lora_unet_", True),
)
_UNSUPPORTED = (
    ("dora_scale", "DoRA (dora_scale) is not supported: only plain LoRA (down/up, alpha) and full deltas"),
    (".lora_mid.", "LoCon/LoHa mid weights (lora_mid) are not supported: only plain LoRA of Linear layers"),
    ("k_img", "cross-attention k_img/v_img are Wan2.1-I2V image layers; Wan2.2 has no image cross-attention"),
    ("v_img", "cross-attention k_img/v_img are Wan2.1-I2V image layers; Wan2.2 has no image cross-attention"),
    ("add_k_proj", "add_k_proj/add_v_proj are Wan2.1-I2V image layers; Wan2.2 has no image cross-attention"),
    ("add_v_proj", "add_k_proj/add_v_proj are Wan2.1-I2V image layers; Wan2.2 has no image cross-attention"),
    ("patch_embedding", "the patch embedding is a Conv3d; LoRA / deltas on it are not supported"),
)


def _tables():
    """(block table, top table): every name variant (official / diffusers, dotted / underscored) of a module or
    parameter -> its official name; block entries without the ``blocks.N.`` part."""
    shapes = official_shapes(TINY.replace(num_layers=1))
    block, top = {}, {}
    for key in shapes:
        if key.startswith("blocks.0."):
            rest = key[len("blocks.0.") :]
            names, table = [rest], block
            dif = official_to_diffusers(key)[len("blocks.0.") :]
        else:
            names, table, dif = [key], top, official_to_diffusers(key)
        names.append(dif)
        for suffix in (".weight", ".bias"):
            if key.endswith(suffix):
                off_mod = (key[len("blocks.0.") :] if table is block else key)[: -len(suffix)]
                for n in names:
                    mod = n[: -len(suffix)]
                    table.setdefault(mod, off_mod)
                    table.setdefault(mod.replace(".", "_"), off_mod)
    return block, top


_BLOCK_NAMES, _TOP_NAMES = _tables()
_LINEAR_MODULES_BLOCK = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"} | {
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
}
_LINEAR_MODULES_TOP = {
    "text_embedding.0",
    "text_embedding.2",
    "time_embedding.0",
    "time_embedding.2",
    "time_projection.1",
    "head.head",
}
_BLOCK_DOT = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_US = re.compile(r"^_?blocks_(\d+)_(.+)$")


def official_module(name: str, underscored: bool = False) -> str | None:
    """The official module name (``"blocks.3.self_attn.q"``) of a module name in any accepted spelling (official
    or diffusers; dotted, or with underscores when ``underscored``), prefixes already removed; None if unknown."""
    m = (_BLOCK_US if underscored else _BLOCK_DOT).match(name)
    if m:
        rest = m.group(2)
        off = _BLOCK_NAMES.get(rest)
        return None if off is None else f"blocks.{int(m.group(1))}.{off}"
    if name.startswith("blocks.") or name.startswith("blocks_"):
        return None
    return _TOP_NAMES.get(name)


def _is_linear(module: str) -> bool:
    m = _BLOCK_DOT.match(module)
    return (m.group(2) in _LINEAR_MODULES_BLOCK) if m else module in _LINEAR_MODULES_TOP


# ------------------------------------------------------------------------------------------------ parsing
def _split_key(key: str):
    """-> (prefix label, underscored, module part, role, family) or None when the key has no known suffix."""
    body, label, us = key, "", False
    for prefix, lab, underscored in _PREFIXES:
        if key.startswith(prefix):
            body, label, us = key[len(prefix) :], lab, underscored
            break
    if body.endswith(".diff_m") or body.endswith("_diff_m"):
        return label, us, body[: -len(".diff_m")], "diff_m", ""
    for suffix, role, family in _SUFFIXES:
        if body.endswith(suffix):
            return label, us, body[: -len(suffix)], role, family
    return None


def _as_f32(key: str, arr, source: str) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype.kind != "f" and str(a.dtype) != "bfloat16":
        raise LoraError(f"{source}: key {key!r}: expected a float tensor (float32/float16/bfloat16), got {a.dtype}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise LoraError(f"{source}: key {key!r}: holds NaN/Inf")
    return a


def _metadata_alpha(metadata: Mapping[str, str] | None, source: str) -> float | None:
    """``lora_alpha / r`` * r -> the alpha PEFT / diffusers record in ``lora_adapter_metadata`` (None if absent)."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return None
    try:
        meta = json.loads(metadata["lora_adapter_metadata"])
    except json.JSONDecodeError as e:
        raise LoraError(f"{source}: header 'lora_adapter_metadata' is not JSON: {e}") from e
    if isinstance(meta, dict) and "transformer" in meta and isinstance(meta["transformer"], dict):
        meta = meta["transformer"]  # diffusers nests it per component
    if not isinstance(meta, dict) or meta.get("lora_alpha") is None:
        return None
    if meta.get("alpha_pattern") or meta.get("rank_pattern"):
        raise LoraError(
            f"{source}: 'lora_adapter_metadata' has alpha_pattern/rank_pattern (per-module alpha); not supported, "
            "write per-module '.alpha' tensors instead"
        )
    return float(meta["lora_alpha"])


def parse_lora(
    tensors: Mapping[str, np.ndarray],
    cfg: WanConfig | None = None,
    *,
    source: str = "<dict>",
    metadata: Mapping[str, str] | None = None,
    ignore_unknown: bool = False,
    name: str = "",
) -> LoraWeights:
    """Parse a LoRA state dict (key -> array) in any accepted format (module docstring) into `LoraWeights`.

    With ``cfg`` (the expert's `WanConfig`) every module and shape is checked against the model (`LoraError` naming
    ``source``, the key, expected and got). Keys that match no format or name no module of a Wan2.2 DiT are listed
    in one `LoraError`; ``ignore_unknown=True`` drops them with a warning and records them in ``ignored``.
    """
    if not tensors:
        raise LoraError(f"{source}: the LoRA file holds no tensors")
    parts: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    diffs: dict[str, np.ndarray] = {}
    diff_keys: dict[str, str] = {}
    unknown, problems = [], []
    labels, families = set(), set()
    has_alpha = False
    for key in sorted(tensors):
        bad = next((msg for pat, msg in _UNSUPPORTED if pat in key), None)
        if bad is not None:
            problems.append(f"key {key!r}: {bad}")
            continue
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        label, us, mod_name, role, family = split
        if role == "diff_m":
            mb = re.fullmatch(r"_?blocks[._](\d+)", mod_name)
            if mb is None:
                unknown.append(key)
                continue
            param = f"blocks.{int(mb.group(1))}.modulation"
            diffs[param], diff_keys[param] = _as_f32(key, tensors[key], source), key
            labels.add(label)
            continue
        module = official_module(mod_name, underscored=us)
        if module is None:
            unknown.append(key)
            continue
        labels.add(label)
        if family:
            families.add(family)
        if role in ("diff", "diff_b"):
            param = module + (".weight" if role == "diff" else ".bias")
            if param in diffs:
                problems.append(f"key {key!r}: a second delta for {param!r} (first: {diff_keys[param]!r})")
                continue
            diffs[param], diff_keys[param] = _as_f32(key, tensors[key], source), key
            continue
        if not _is_linear(module):
            problems.append(
                f"key {key!r}: module {module!r} is not a Linear; a LoRA ({role}) applies to Linear layers only "
                "(norms and modulation take full deltas: .diff / diff_m)"
            )
            continue
        slot = parts.setdefault(module, {})
        if role in slot:
            problems.append(f"key {key!r}: a second {role} for module {module!r} (first: {slot[role][0]!r})")
            continue
        has_alpha |= role == "alpha"
        slot[role] = (key, tensors[key])
    meta_alpha = _metadata_alpha(metadata, source)
    modules: dict[str, LoraModule] = {}
    for module, slot in sorted(parts.items()):
        keys = tuple(k for k, _ in slot.values())
        if "down" not in slot or "up" not in slot:
            have = ", ".join(repr(k) for k in keys)
            miss = "down (lora_down / lora_A)" if "down" not in slot else "up (lora_up / lora_B)"
            problems.append(f"module {module!r}: has {have} but no {miss} tensor")
            continue
        dk, down = slot["down"][0], _as_f32(slot["down"][0], slot["down"][1], source)
        uk, up = slot["up"][0], _as_f32(slot["up"][0], slot["up"][1], source)
        if down.ndim != 2 or up.ndim != 2:
            problems.append(
                f"module {module!r}: down {dk!r} and up {uk!r} must be 2-D ([r, in] / [out, r]), got "
                f"{down.shape} and {up.shape}"
            )
            continue
        if up.shape[1] != down.shape[0]:
            problems.append(
                f"module {module!r}: rank mismatch: down {dk!r} is {down.shape} (rank {down.shape[0]}), up {uk!r} is "
                f"{up.shape} (rank {up.shape[1]})"
            )
            continue
        alpha = meta_alpha
        if "alpha" in slot:
            ak, a = slot["alpha"]
            a = np.asarray(a)
            if a.size != 1:
                problems.append(f"key {ak!r}: alpha must be a scalar, got shape {a.shape}")
                continue
            alpha = float(a.astype(np.float32).reshape(()))
            if not np.isfinite(alpha):
                problems.append(f"key {ak!r}: alpha is not finite ({alpha})")
                continue
        lm = LoraModule(module=module, down=down, up=up, alpha=alpha, keys=keys)
        modules[module] = lm
        if "up_bias" in slot:
            bk, b = slot["up_bias"]
            param = module + ".bias"
            if param in diffs:
                problems.append(f"key {bk!r}: a second bias delta for {param!r} (first: {diff_keys[param]!r})")
            else:
                diffs[param], diff_keys[param] = lm.scale * _as_f32(bk, b, source), bk
    if unknown and not ignore_unknown:
        problems.append(
            f"{len(unknown)} key(s) name no Wan2.2 DiT LoRA tensor: {unknown[:8]}"
            + (f" ... (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
            + " (pass ignore_unknown=True to skip them)"
        )
    if not modules and not diffs and not problems:
        problems.append(
            "no LoRA module found (expected keys like 'diffusion_model.blocks.0.self_attn.q.lora_down.weight')"
        )
    fmt = _format_label(labels, families, has_alpha or meta_alpha is not None)
    lw = LoraWeights(
        source=source,
        format=fmt,
        modules=modules,
        diffs=diffs,
        ignored=tuple(unknown) if ignore_unknown else (),
        name=name or (os.path.basename(source) if source != "<dict>" else source),
    )
    if cfg is not None and not problems:
        problems.extend(_check_against(lw, cfg, diff_keys))
    if problems:
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems, first: {problems[0]}"
        raise LoraError(f"{source}: {head}", [f"{source}: {p}" for p in problems])
    if unknown:
        warnings.warn(f"{source}: ignored {len(unknown)} unknown key(s): {unknown[:8]}", stacklevel=3)
    return lw


def _format_label(labels, families, alpha: bool) -> str:
    lab = {
        "": "official",
        "diffusion_model.": "official",
        "model.diffusion_model.": "ComfyUI",
        "transformer.": "diffusers",
        "PEFT base_model.model.": "PEFT",
        "PEFT base_model.model.diffusion_model.": "PEFT",
        "lora_unet_": "kohya",
        "lora_unet__": "kohya (Wan-Fun)",
        "lora_transformer_": "kohya (diffusers names)",
    }
    kinds = sorted({lab.get(x, x) for x in labels}) or ["official"]
    prefixes = sorted(x or "no prefix" for x in labels)
    return (
        f"{'+'.join(kinds)} ({', '.join(prefixes)}; {', '.join(sorted(families)) or 'full deltas'}"
        f"{', alpha' if alpha else ''})"
    )


def _check_against(lw: LoraWeights, cfg: WanConfig, diff_keys: Mapping[str, str]) -> list[str]:
    """Every module / delta fits ``cfg`` (block index, in / out features)."""
    shapes = official_shapes(cfg)
    out = []
    for module, lm in lw.modules.items():
        wkey = module + ".weight"
        if wkey not in shapes:
            m = _BLOCK_DOT.match(module)
            why = f"the model has {cfg.num_layers} blocks (0..{cfg.num_layers - 1})" if m else "not in the model"
            out.append(f"key {lm.keys[0]!r}: module {module!r}: {why}")
            continue
        n, k = shapes[wkey]
        if lm.down.shape[1] != k or lm.up.shape[0] != n:
            out.append(
                f"module {module!r} (keys {list(lm.keys)}): expected down [r, {k}] and up [{n}, r] for a Linear "
                f"{k} -> {n}; got down {list(lm.down.shape)} and up {list(lm.up.shape)} (a LoRA for another model size?)"
            )
    for param, d in lw.diffs.items():
        if param not in shapes:
            m = _BLOCK_DOT.match(param)
            why = f"the model has {cfg.num_layers} blocks" if m else "not in the model"
            out.append(f"key {diff_keys.get(param, param)!r}: parameter {param!r}: {why}")
            continue
        want = shapes[param]
        if tuple(d.shape) != tuple(want) and int(np.prod(d.shape)) != int(np.prod(want)):
            out.append(
                f"key {diff_keys.get(param, param)!r}: delta of {param!r} must have shape {list(want)}, got {list(d.shape)}"
            )
        else:
            lw.diffs[param] = d.reshape(want)
    return out


def read_lora(
    path: str | os.PathLike,
    cfg: WanConfig | None = None,
    *,
    ignore_unknown: bool = False,
    name: str = "",
) -> LoraWeights:
    """Read a LoRA ``.safetensors`` file (any accepted format, module docstring); with ``cfg`` also check it fits
    the model. ``LoraError`` names the file, the key, expected and got."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated / not safetensors
        raise LoraError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return parse_lora(tensors, cfg, source=path, metadata=metadata, ignore_unknown=ignore_unknown, name=name)
