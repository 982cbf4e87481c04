"""Model configurations for the Wan2.2 image-to-video DiT.

`WanConfig` holds the architecture hyper-parameters of one expert (both experts of
Wan2.2-I2V-A14B share them). Presets:

* ``I2V_A14B`` - the published Wan2.2-I2V-A14B expert (14,288,901,184 parameters).
* ``TINY``     - a small random config used by the tests.

`config_from_json` reads a checkpoint's ``config.json`` written either by the official
code (``WanModel``: ``dim``, ``ffn_dim``, ``num_heads`` ...) or by diffusers
(``WanTransformer3DModel``: ``num_attention_heads``, ``attention_head_dim`` ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of one Wan DiT expert."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    boundary: float = 0.900
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head given to the (t, h, w) RoPE axes, e.g. 44/42/42 for 128."""
        d = self.head_dim
        hw = 2 * (d // 6)
        return (d - 2 * hw, hw, hw)

    def replace(self, **kw) -> "WanConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


I2V_A14B = WanConfig()

TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=16, freq_dim=32)


_OFFICIAL_FIELDS = (
    "dim",
    "ffn_dim",
    "num_heads",
    "num_layers",
    "in_dim",
    "out_dim",
    "text_dim",
    "text_len",
    "freq_dim",
    "eps",
    "patch_size",
)


def config_from_dict(d: dict[str, Any], source: str = "<dict>") -> WanConfig:
    """Build a `WanConfig` from an official (``WanModel``) or diffusers config dict."""
    kw: dict[str, Any] = {}
    if "num_attention_heads" in d or d.get("_class_name") == "WanTransformer3DModel":
        try:
            heads = int(d["num_attention_heads"])
            kw["dim"] = heads * int(d["attention_head_dim"])
            kw["num_heads"] = heads
            kw["ffn_dim"] = int(d["ffn_dim"])
            kw["num_layers"] = int(d["num_layers"])
            kw["in_dim"] = int(d["in_channels"])
            kw["out_dim"] = int(d["out_channels"])
            kw["text_dim"] = int(d["text_dim"])
            kw["freq_dim"] = int(d["freq_dim"])
        except KeyError as e:
            raise ValueError(f"{source}: diffusers config is missing field {e.args[0]!r}") from None
        kw["eps"] = float(d.get("eps", 1e-6))
        if "patch_size" in d:
            kw["patch_size"] = tuple(int(p) for p in d["patch_size"])
        if d.get("rope_max_seq_len"):
            kw["rope_max_seq_len"] = int(d["rope_max_seq_len"])
        if d.get("image_dim") or d.get("added_kv_proj_dim"):
            raise ValueError(
                f"{source}: image_dim/added_kv_proj_dim are set: this is a Wan2.1 image-conditioned "
                "model (CLIP branch), which Wan2.2-I2V does not have"
            )
    else:
        missing = [k for k in ("dim", "ffn_dim", "num_heads", "num_layers") if k not in d]
        if missing:
            raise ValueError(
                f"{source}: not a Wan config (missing fields {missing}); expected official "
                "WanModel fields (dim, ffn_dim, num_heads, ...) or diffusers fields "
                "(num_attention_heads, attention_head_dim, ...)"
            )
        for k in _OFFICIAL_FIELDS:
            if k in d:
                v = d[k]
                kw[k] = tuple(int(p) for p in v) if k == "patch_size" else type(getattr(I2V_A14B, k))(v)
        if d.get("model_type", "i2v") not in ("i2v", "t2v", "ti2v"):
            raise ValueError(f"{source}: unsupported model_type {d.get('model_type')!r}")
    if tuple(kw.get("patch_size", (1, 2, 2))) != (1, 2, 2):
        raise ValueError(f"{source}: patch_size {kw['patch_size']} is not supported (expected (1, 2, 2))")
    return WanConfig(**kw)


def config_from_json(path: str | os.PathLike) -> WanConfig:
    """Read a ``config.json`` (official or diffusers fields)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: config.json is not valid JSON ({e})") from None
    return config_from_dict(d, source=str(path))


def official_config_dict(cfg: WanConfig) -> dict[str, Any]:
    """The ``config.json`` the official code writes for an expert (``WanModel``).

    The official file has no ``text_dim`` (its ``WanModel`` does not record it; it is always 4096); for smaller
    models (tests, the shipped mini model) ``text_dim`` is added so the file stays self-describing.
    """
    extra = {} if cfg.text_dim == 4096 else {"text_dim": cfg.text_dim}
    return extra | {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "model_type": "i2v",
        "text_len": cfg.text_len,
        "in_dim": cfg.in_dim,
        "dim": cfg.dim,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "out_dim": cfg.out_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "eps": cfg.eps,
    }


def diffusers_model_kwargs(cfg: WanConfig) -> dict[str, Any]:
    """The ``WanTransformer3DModel`` constructor arguments of an expert (the Wan2.2 I2V expert: no image branch)."""
    return dict(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=cfg.rope_max_seq_len,
    )


def diffusers_config_dict(cfg: WanConfig) -> dict[str, Any]:
    """The ``config.json`` diffusers writes for ``WanTransformer3DModel`` (its fields in sorted order)."""
    d = diffusers_model_kwargs(cfg) | {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(cfg.patch_size),
        "pos_embed_seq_len": None,
    }
    return dict(sorted(d.items()))
