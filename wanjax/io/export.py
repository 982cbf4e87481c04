"""Write a `WanDiT` expert in a published checkpoint layout (the inverse of `load_dit`).

`save_dit(model, out_dir, layout="official")` writes ``config.json`` + ``diffusion_pytorch_model-0000k-of-0000n.
safetensors`` shards + ``diffusion_pytorch_model.safetensors.index.json`` (as the official and diffusers repos
ship them), atomically: everything goes to a temp dir that is renamed at the end. Used by the mini-model trainer and
the demo, so the real loader is exercised on what we ship.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from flax import nnx

from wanjax.config import WanConfig, diffusers_config_dict, official_config_dict
from wanjax.io import keymap
from wanjax.io.atomic import make_temp_dir, publish_dir

_STEM = "diffusion_pytorch_model"


def _get(tree: dict, path) -> np.ndarray:
    for p in path:
        tree = tree[p]
    return np.asarray(tree)


def _to_torch_layout(kind: str, w: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(w.T)
    if kind == "patch":  # [(pt, ph, pw, c), O] -> [O, C, pt, ph, pw]
        o, c, pt, ph, pw = torch_shape
        return np.ascontiguousarray(w.reshape(pt, ph, pw, c, o).transpose(4, 3, 0, 1, 2))
    return np.ascontiguousarray(w.reshape(torch_shape))


def export_state_dict(
    model_or_params, cfg: WanConfig | None = None, layout: str = "official", dtype=None
) -> dict[str, np.ndarray]:
    """``{key: array}`` in PyTorch layout for ``layout`` in {"official", "diffusers"} (``dtype``: cast, e.g.
    ``np.float32`` or ``ml_dtypes.bfloat16``; default keeps each parameter's dtype)."""
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    if isinstance(model_or_params, nnx.Module):
        cfg = cfg or model_or_params.cfg
        params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    else:
        params = model_or_params
        if cfg is None:
            raise ValueError("export_state_dict: pass cfg with a params dict")
    out = {}
    for key, shape in keymap.official_shapes(cfg).items():
        t = keymap.official_to_wanjax(key)
        w = _get(params, t.path)
        if t.layer is not None:
            w = w[t.layer]
        w = _to_torch_layout(t.kind, w, shape)
        if dtype is not None:
            w = w.astype(dtype)
        name = key if layout == "official" else keymap.official_to_diffusers(key)
        out[name] = w
    return out


def save_dit(
    model, out_dir: str | os.PathLike, layout: str = "official", dtype=None, max_shard_bytes: int = 5 << 30
) -> str:
    """Write ``model`` as an expert dir in ``layout``; returns ``out_dir``. Refuses to overwrite a non-empty dir."""
    from safetensors.numpy import save_file

    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to overwrite")
    cfg = model.cfg
    sd = export_state_dict(model, cfg, layout, dtype)
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + v.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    tmp = make_temp_dir(out_dir, "tmp-export")
    try:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"{_STEM}-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": int(sum(v.nbytes for v in sd.values()))}, "weight_map": weight_map}
        with open(os.path.join(tmp, f"{_STEM}.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        conf = official_config_dict(cfg) if layout == "official" else diffusers_config_dict(cfg)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(conf, f, indent=2)
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise FileExistsError(f"{out_dir}: exists and is not empty; refusing to overwrite")
        publish_dir(tmp, out_dir)  # umask modes (mkdtemp makes 0700); an empty out_dir is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
