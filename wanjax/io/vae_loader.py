"""Load Wan2.1 VAE weights into `wanjax.model.vae.WanVAE`.

Two source layouts are understood, both PyTorch-shaped (``[out, in, kt, kh, kw]`` convs):

* official ``Wan2.1_VAE.pth`` (``wan/modules/vae2_1.py``: ``encoder.conv1``,
  ``encoder.downsamples.N.residual.{0,2,3,6}``, ``encoder.middle.{0,1,2}``, ``encoder.head.{0,2}``,
  ``conv1``/``conv2``, ``decoder.upsamples.N``, ...);
* diffusers ``vae/`` folder (``AutoencoderKLWan``: ``config.json`` + ``diffusion_pytorch_model.safetensors``;
  ``encoder.conv_in``, ``encoder.down_blocks.N.{norm1,conv1,norm2,conv2,conv_shortcut}``,
  ``encoder.mid_block.{resnets,attentions}``, ``quant_conv``, ``decoder.up_blocks.I.{resnets.J,upsamplers.0}``, ...).

The rename map is derived from the `WanVAE` module tree itself (`vae_key_table`), so both layouts are
checked key by key and shape by shape against the model being filled.

Public API: `vae_key_table`, `detect_layout`, `load_vae_state_dict`, `read_official_pth`,
`read_safetensors`, `vae_config_from_dict`, `load_vae` (file or folder -> `WanVAE`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.io.errors import CheckpointError
from wanjax.io.pth import read_pth
from wanjax.model.vae import VAEConfig, WanVAE, abstract_vae

OFFICIAL = "official"
DIFFUSERS = "diffusers"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

_RES_OFFICIAL = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
_LEAF = {
    "kernel": "weight",
    "bias": "bias",
    "gamma": "gamma",
    "to_qkv_kernel": "to_qkv.weight",
    "to_qkv_bias": "to_qkv.bias",
    "proj_kernel": "proj.weight",
    "proj_bias": "proj.bias",
}


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One parameter: its path in `WanVAE`, its key in each layout, its shapes and conversion kind."""

    path: tuple
    diffusers: str
    official: str
    jax_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    kind: str  # conv3d | conv2d | linear1x1 | vector


def _diffusers_tokens(path: tuple) -> list[str]:
    """Module path in `WanVAE` -> diffusers key tokens (the module trees differ only in two names)."""
    toks: list[str] = []
    for p in path[:-1]:
        p = str(p)
        if p == "upsampler":
            toks += ["upsamplers", "0"]
        elif p == "conv":  # only `Resample` has a child named `conv` (torch: Sequential(pad|upsample, conv))
            toks += ["resample", "1"]
        else:
            toks.append(p)
    return toks + _LEAF[str(path[-1])].split(".")


def _official_tokens(d: list[str], cfg: VAEConfig) -> list[str]:
    """diffusers key tokens -> official ``vae2_1.py`` key tokens."""
    if d[0] in ("quant_conv", "post_quant_conv"):
        return ["conv1" if d[0] == "quant_conv" else "conv2"] + d[1:]
    side, rest = d[0], d[1:]
    out: list[str]
    if rest[0] == "conv_in":
        out = ["conv1"] + rest[1:]
    elif rest[0] == "norm_out":
        out = ["head", "0"] + rest[1:]
    elif rest[0] == "conv_out":
        out = ["head", "2"] + rest[1:]
    elif rest[0] == "mid_block":
        idx = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[".".join(rest[1:3])]
        out = ["middle", idx] + _res_tokens(rest[3:])
    elif rest[0] == "down_blocks":
        out = ["downsamples", rest[1]] + _res_tokens(rest[2:])
    elif rest[0] == "up_blocks":
        i = int(rest[1])
        per_block = [
            cfg.num_res_blocks + 1 + (1 if b != len(cfg.dim_mult) - 1 else 0) for b in range(len(cfg.dim_mult))
        ]
        base = sum(per_block[:i])
        if rest[2] == "resnets":
            out = ["upsamples", str(base + int(rest[3]))] + _res_tokens(rest[4:])
        else:  # upsamplers.0.<resample.1 | time_conv>...
            out = ["upsamples", str(base + cfg.num_res_blocks + 1)] + rest[4:]
    else:
        raise KeyError(f"vae_loader: no official name for diffusers key {'.'.join(d)!r}")
    return [side] + out


def _res_tokens(t: list[str]) -> list[str]:
    if t and t[0] in _RES_OFFICIAL:
        return _RES_OFFICIAL[t[0]].split(".") + t[1:]
    return t


def _torch_shape(kind: str, shape: tuple[int, ...], attn_norm: bool) -> tuple[int, ...]:
    if kind == "conv3d":
        kt, kh, kw, i, o = shape
        return (o, i, kt, kh, kw)
    if kind == "conv2d":
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if kind == "linear1x1":
        i, o = shape
        return (o, i, 1, 1)
    if kind == "gamma":
        return (shape[0], 1, 1) if attn_norm else (shape[0], 1, 1, 1)
    return shape


def vae_key_table(vae_or_cfg: WanVAE | VAEConfig) -> list[KeyEntry]:
    """Every parameter of a `WanVAE` with its diffusers and official key (no weights allocated)."""
    if isinstance(vae_or_cfg, VAEConfig):
        cfg = vae_or_cfg
        vae = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    else:
        vae, cfg = vae_or_cfg, vae_or_cfg.cfg
    table = []
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        shape = tuple(var.get_value().shape)
        leaf = str(path[-1])
        if leaf == "gamma":
            kind = "gamma"
        elif leaf.endswith("kernel"):
            kind = {5: "conv3d", 4: "conv2d", 2: "linear1x1"}[len(shape)]
        else:
            kind = "vector"
        d = _diffusers_tokens(path)
        o = _official_tokens(d, cfg)
        attn_norm = "attentions" in d
        table.append(KeyEntry(tuple(path), ".".join(d), ".".join(o), shape, _torch_shape(kind, shape, attn_norm), kind))
    return table


def _to_jax_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv3d":
        return np.transpose(a, (2, 3, 4, 1, 0))
    if kind == "conv2d":
        return np.transpose(a, (2, 3, 1, 0))
    if kind == "linear1x1":
        return np.transpose(a[:, :, 0, 0], (1, 0))
    if kind == "gamma":
        return a.reshape(a.shape[0])
    return a


def detect_layout(keys) -> str:
    """``"official"`` or ``"diffusers"`` from the state-dict keys."""
    keys = set(keys)
    if "encoder.conv_in.weight" in keys or "quant_conv.weight" in keys:
        return DIFFUSERS
    if "encoder.conv1.weight" in keys or "conv1.weight" in keys:
        return OFFICIAL
    sample = sorted(keys)[:5]
    raise CheckpointError(
        "vae_loader: not a Wan VAE state dict: expected key 'encoder.conv_in.weight' (diffusers) "
        f"or 'encoder.conv1.weight' (official Wan2.1_VAE.pth); got keys like {sample}"
    )


def load_vae_state_dict(
    vae: WanVAE, state_dict: Mapping[str, Any], layout: str | None = None, source: str = "<state_dict>"
) -> WanVAE:
    """Fill ``vae``'s parameters (in place, cast to their dtype) from a PyTorch-layout state dict.

    ``vae`` may be a real model or a shape-only one from `wanjax.model.vae.abstract_vae` (cheapest).

    ``state_dict`` values may be numpy arrays or anything ``np.asarray`` accepts (torch CPU tensors
    too). Raises `wanjax.io.errors.CheckpointError` (a ``ValueError``) naming the key, expected and
    actual shape on any missing, unexpected or mis-shaped tensor.
    """
    layout = layout or detect_layout(state_dict.keys())
    if layout not in (OFFICIAL, DIFFUSERS):
        raise CheckpointError(f"vae_loader: layout must be {OFFICIAL!r} or {DIFFUSERS!r}, got {layout!r}")
    table = vae_key_table(vae)
    wanted = {getattr(e, layout): e for e in table}
    missing = [k for k in wanted if k not in state_dict]
    if missing:
        e = wanted[missing[0]]
        raise CheckpointError(
            f"{source}: missing {len(missing)} VAE tensor(s) ({layout} layout), e.g. key "
            f"{missing[0]!r} (expected shape {e.torch_shape}); first missing: {missing[:5]}"
        )
    unexpected = sorted(k for k in state_dict if k not in wanted)
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected VAE tensor(s) for the {layout} layout of "
            f"this config, e.g. {unexpected[:5]} (wrong config or not a Wan2.1 VAE?)"
        )
    state = nnx.state(vae, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for key, e in wanted.items():
        a = _as_numpy(state_dict[key], key, source)
        if tuple(a.shape) != e.torch_shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(a.shape)}, expected {e.torch_shape}")
        var = flat[e.path]
        var.set_value(jnp.asarray(_to_jax_layout(e.kind, a), dtype=var.get_value().dtype))
    nnx.update(vae, state)
    return vae


def _as_numpy(v: Any, key: str, source: str) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor (bf16 has no numpy dtype: go through fp32)
        import torch

        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        return v.numpy()
    try:
        return np.asarray(v)
    except Exception as err:  # pragma: no cover - defensive
        raise CheckpointError(f"{source}: tensor {key!r} is not array-like ({type(v).__name__})") from err


def read_official_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``Wan2.1_VAE.pth`` as numpy arrays (stored dtype; bf16 as ``ml_dtypes.bfloat16``) without torch.

    `wanjax.io.pth.read_pth`: a restricted unpickler over the zip checkpoint that builds tensors only and runs no
    code from the file; raises `CheckpointError` naming the file for anything else.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: VAE checkpoint not found")
    return read_pth(path)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays (bf16 via ml_dtypes); no torch needed."""
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: safetensors file not found")
    return load_file(str(path))


def vae_config_from_dict(d: Mapping[str, Any], source: str = "<config>") -> VAEConfig:
    """`VAEConfig` from a diffusers ``AutoencoderKLWan`` ``config.json`` dict (Wan2.1 variant only)."""
    if d.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"{source}: _class_name is {d.get('_class_name')!r}, expected 'AutoencoderKLWan'")
    if d.get("is_residual") or d.get("patch_size") not in (None, 1):
        raise ValueError(
            f"{source}: is_residual/patch_size are set: this is the Wan2.2 (TI2V-5B) VAE, not the "
            "Wan2.1 VAE used by Wan2.2-I2V-A14B"
        )
    if d.get("attn_scales"):
        raise ValueError(f"{source}: attn_scales {d['attn_scales']} unsupported (Wan2.1 VAE uses [])")
    if d.get("decoder_base_dim") not in (None, d.get("base_dim", 96)):
        raise ValueError(f"{source}: decoder_base_dim {d['decoder_base_dim']} != base_dim unsupported")
    dm = tuple(d.get("dim_mult", VAEConfig.dim_mult))
    td = tuple(d.get("temperal_downsample", d.get("temporal_downsample", VAEConfig.temporal_downsample)))
    td = td[: len(dm) - 1]
    kw: dict[str, Any] = dict(
        base_dim=int(d.get("base_dim", 96)),
        z_dim=int(d.get("z_dim", 16)),
        dim_mult=dm,
        num_res_blocks=int(d.get("num_res_blocks", 2)),
        temporal_downsample=td,
        in_channels=int(d.get("in_channels", 3)),
        out_channels=int(d.get("out_channels", 3)),
    )
    if d.get("latents_mean") is not None:
        kw["latents_mean"] = tuple(d["latents_mean"])
    if d.get("latents_std") is not None:
        kw["latents_std"] = tuple(d["latents_std"])
    try:
        return VAEConfig(**kw)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def vae_config_from_official_state(sd: Mapping[str, Any], **overrides) -> VAEConfig:
    """The `VAEConfig` implied by the shapes of an official-layout (``Wan2.1_VAE.pth``) state dict.

    Reads the base width from ``encoder.conv1``, z from ``conv2`` (post-quant conv), and walks
    ``encoder.downsamples.N`` (residual blocks carry ``residual.2.weight``; resamples ``resample.1.weight``, plus
    ``time_conv.weight`` when they also halve time) for the level widths, residual blocks per level and temporal
    down-sampling. Latent mean/std are not stored in the file: they keep the Wan2.1 values unless overridden.
    """

    def shape(k):
        if k not in sd:
            raise KeyError(f"official VAE state dict: missing key {k!r} (needed to infer the config)")
        return tuple(sd[k].shape)

    base = shape("encoder.conv1.weight")[0]
    z = shape("conv2.weight")[0]
    idx = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.downsamples\.(\d+)\.", k)] if m})
    if not idx:
        raise KeyError("official VAE state dict: no 'encoder.downsamples.N' keys")
    levels: list[list[int]] = [[]]
    temporal: list[bool] = []
    for i in idx:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in sd:
            levels[-1].append(shape(p + "residual.2.weight")[0])
        elif p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            levels.append([])
        else:
            raise KeyError(f"official VAE state dict: {p[:-1]!r} is neither a residual block nor a resample")
    nres = {len(lv) for lv in levels}
    if len(nres) != 1:
        raise ValueError(f"official VAE state dict: levels have different numbers of residual blocks {nres}")
    mult = []
    for lv in levels:
        if lv[-1] % base:
            raise ValueError(f"official VAE state dict: level width {lv[-1]} is not a multiple of base {base}")
        mult.append(lv[-1] // base)
    kw: dict[str, Any] = dict(
        base_dim=base, z_dim=z, dim_mult=tuple(mult), num_res_blocks=nres.pop(), temporal_downsample=tuple(temporal)
    )
    kw.update(overrides)
    return VAEConfig(**kw)


def load_vae(
    path: str | os.PathLike, cfg: VAEConfig | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32
) -> WanVAE:
    """Build a `WanVAE` and load weights from ``Wan2.1_VAE.pth`` (official) or a diffusers ``vae/`` folder.

    For a folder, the config comes from its ``config.json`` (``cfg`` must then be None or equal);
    for a ``.pth`` file, ``cfg`` defaults to the config implied by the tensor shapes (`vae_config_from_official_state`:
    the published Wan2.1 VAE for ``Wan2.1_VAE.pth``, smaller widths for e.g. the shipped mini model).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        w_path = os.path.join(path, DIFFUSERS_WEIGHTS)
        missing = [p for p in (cfg_path, w_path) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{path}: diffusers VAE folder is incomplete, missing {missing}")
        with open(cfg_path, encoding="utf-8") as f:
            try:
                file_cfg = vae_config_from_dict(json.load(f), source=cfg_path)
            except json.JSONDecodeError as err:
                raise ValueError(f"{cfg_path}: not valid JSON ({err})") from None
        if cfg is not None and cfg != file_cfg:
            raise ValueError(f"{path}: config.json gives {file_cfg}, but cfg={cfg} was passed")
        sd, source = read_safetensors(w_path), w_path
        cfg = file_cfg
    elif os.path.isfile(path):
        sd, source = read_official_pth(path), path
        if cfg is None:
            try:
                cfg = vae_config_from_official_state(sd)
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot infer the VAE config from the tensor shapes: {e}") from None
    else:
        raise FileNotFoundError(f"{path}: no such VAE file or folder")
    return load_vae_state_dict(abstract_vae(cfg, dtype=dtype, param_dtype=param_dtype), sd, source=source)
