"""Load UMT5 encoder weights into `wanjax.model.t5.UMT5Encoder`.

Two source layouts are supported:

* **official** - the state dict of ``Wan-Video/Wan2.2:wan/modules/t5.py:T5Encoder``, as stored in
  ``models_t5_umt5-xxl-enc-bf16.pth``::

      token_embedding.weight                         [vocab, dim]
      blocks.N.norm1.weight / blocks.N.norm2.weight  [dim]
      blocks.N.attn.{q,k,v}.weight                   [dim_attn, dim]   (torch Linear: [out, in])
      blocks.N.attn.o.weight                         [dim, dim_attn]
      blocks.N.ffn.gate.0.weight / ffn.fc1.weight    [dim_ffn, dim]
      blocks.N.ffn.fc2.weight                        [dim, dim_ffn]
      blocks.N.pos_embedding.embedding.weight        [num_buckets, heads]
      norm.weight                                    [dim]

* **hf** - ``transformers.UMT5EncoderModel`` (the diffusers ``text_encoder/`` folder, safetensors)::

      shared.weight (or encoder.embed_tokens.weight)
      encoder.block.N.layer.0.layer_norm.weight
      encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight
      encoder.block.N.layer.0.SelfAttention.relative_attention_bias.weight
      encoder.block.N.layer.1.layer_norm.weight
      encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight   (wi_0 = gelu gate, wi_1 = linear)
      encoder.final_layer_norm.weight

Torch Linear weights ``[out, in]`` become NNX kernels ``[in, out]``; per-layer tensors are stacked on a leading
``num_layers`` axis. The ``.pth`` file is read without torch by `wanjax.io.pth.read_pth` (a restricted unpickler:
tensors only, memory-mapped, no code from the file runs). Safetensors files are read with a small memory-mapped
reader (bf16 included).

Public API: `load_t5_encoder`, `params_from_state_dict`, `encoder_from_params`, `config_from_official_state`,
`config_from_hf_dict`, `read_official_pth`, `read_safetensors`, `OFFICIAL`, `HF`.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from wanjax.io.pth import read_pth
from wanjax.model.t5 import UMT5_XXL, T5Config, UMT5Encoder

OFFICIAL = "official"
HF = "hf"

# our per-layer param path -> (official key suffix, hf key suffix, is_linear)
_LAYER_KEYS: dict[tuple[str, ...], tuple[str, str, bool]] = {
    ("norm1", "scale"): ("norm1.weight", "layer.0.layer_norm.weight", False),
    ("attn", "q", "kernel"): ("attn.q.weight", "layer.0.SelfAttention.q.weight", True),
    ("attn", "k", "kernel"): ("attn.k.weight", "layer.0.SelfAttention.k.weight", True),
    ("attn", "v", "kernel"): ("attn.v.weight", "layer.0.SelfAttention.v.weight", True),
    ("attn", "o", "kernel"): ("attn.o.weight", "layer.0.SelfAttention.o.weight", True),
    ("rel_bias",): ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight", False),
    ("norm2", "scale"): ("norm2.weight", "layer.1.layer_norm.weight", False),
    ("ffn", "gate", "kernel"): ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight", True),
    ("ffn", "fc1", "kernel"): ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight", True),
    ("ffn", "fc2", "kernel"): ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight", True),
}
_LAYER_PREFIX = {OFFICIAL: "blocks.{i}.", HF: "encoder.block.{i}."}
_EMBED_KEYS = {OFFICIAL: ("token_embedding.weight",), HF: ("shared.weight", "encoder.embed_tokens.weight")}
_NORM_KEY = {OFFICIAL: "norm.weight", HF: "encoder.final_layer_norm.weight"}


# ----------------------------------------------------------------------------------------------- file readers


def read_official_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an official ``.pth`` state dict (e.g. ``models_t5_umt5-xxl-enc-bf16.pth``) as numpy arrays.

    No torch needed: `wanjax.io.pth.read_pth` (a restricted unpickler over the zip checkpoint that builds tensors
    only and never runs code from the file). Tensors keep their stored dtype (bf16 as ``ml_dtypes.bfloat16``) and
    are memory-mapped views of the file where torch stored them uncompressed (as it does).
    """
    return read_pth(path)


_ST_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_one_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(size - 8 - n,)) if size > 8 + n else None
    out = {}
    for k, info in header.items():
        if k == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        if dt is None:
            raise ValueError(f"{path}: tensor {k!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        shape = tuple(info["shape"])
        out[k] = (mm[a:b] if mm is not None else np.zeros(0, np.uint8)).view(dt).reshape(shape)
    return out


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map one ``.safetensors`` file, or every ``*.safetensors`` file of a folder, as numpy arrays."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files in this folder")
    else:
        files = [path]
    out: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in _read_one_safetensors(f).items():
            if k in out:
                raise ValueError(f"{f}: tensor {k!r} also appears in another shard")
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------------- configs


def config_from_official_state(sd: Mapping[str, Any], **overrides) -> T5Config:
    """Infer a `T5Config` from the tensor shapes of an official-layout state dict.

    ``max_distance`` / ``eps`` cannot be seen in shapes and take the umT5 values (128, 1e-6) unless overridden.
    """

    def shape(k):
        if k not in sd:
            raise KeyError(f"official T5 state dict: missing key {k!r} (needed to infer the config)")
        return tuple(sd[k].shape)

    vocab, dim = shape("token_embedding.weight")
    n_layers = 0
    while f"blocks.{n_layers}.norm1.weight" in sd:
        n_layers += 1
    if n_layers == 0:
        raise KeyError("official T5 state dict: missing key 'blocks.0.norm1.weight' (no encoder blocks found)")
    buckets, heads = shape("blocks.0.pos_embedding.embedding.weight")
    kw = dict(
        vocab_size=vocab,
        dim=dim,
        dim_attn=shape("blocks.0.attn.q.weight")[0],
        dim_ffn=shape("blocks.0.ffn.fc1.weight")[0],
        num_heads=heads,
        num_layers=n_layers,
        num_buckets=buckets,
        max_distance=128,
        eps=1e-6,
    )
    kw.update(overrides)
    return UMT5_XXL.replace(**kw)


def config_from_hf_dict(d: Mapping[str, Any], source: str = "<config>", **overrides) -> T5Config:
    """`T5Config` from a transformers ``UMT5Config`` dict (``text_encoder/config.json``)."""
    if d.get("model_type", "umt5") != "umt5":
        raise ValueError(
            f"{source}: model_type is {d.get('model_type')!r}; only 'umt5' (per-layer relative "
            "position bias) is supported"
        )
    ffp = d.get("feed_forward_proj", "gated-gelu")
    if ffp != "gated-gelu":
        raise ValueError(f"{source}: feed_forward_proj is {ffp!r}; only 'gated-gelu' is supported")
    try:
        kw = dict(
            vocab_size=int(d["vocab_size"]),
            dim=int(d["d_model"]),
            dim_attn=int(d["num_heads"]) * int(d["d_kv"]),
            dim_ffn=int(d["d_ff"]),
            num_heads=int(d["num_heads"]),
            num_layers=int(d["num_layers"]),
            num_buckets=int(d.get("relative_attention_num_buckets", 32)),
            max_distance=int(d.get("relative_attention_max_distance", 128)),
            eps=float(d.get("layer_norm_epsilon", 1e-6)),
        )
    except KeyError as e:
        raise ValueError(f"{source}: UMT5 config is missing field {e.args[0]!r}") from None
    kw.update(overrides)
    return UMT5_XXL.replace(**kw)


def detect_layout(sd: Mapping[str, Any]) -> str:
    """'official' or 'hf' from the key names; raises if neither matches."""
    if "token_embedding.weight" in sd or "blocks.0.norm1.weight" in sd:
        return OFFICIAL
    if (
        "shared.weight" in sd
        or "encoder.final_layer_norm.weight" in sd
        or "encoder.block.0.layer.0.layer_norm.weight" in sd
    ):
        return HF
    sample = sorted(sd)[:5]
    raise ValueError(
        f"not a UMT5 encoder state dict: expected official keys ('token_embedding.weight', "
        f"'blocks.N....') or transformers keys ('shared.weight', 'encoder.block.N....'); "
        f"got keys like {sample}"
    )


# ------------------------------------------------------------------------------------------------ conversion


def _abstract_params(cfg: T5Config) -> dict:
    abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def params_from_state_dict(
    sd: Mapping[str, Any], cfg: T5Config, layout: str | None = None, source: str = "<state dict>"
) -> dict:
    """Convert a torch-layout state dict (values: numpy arrays or anything ``np.asarray`` accepts) to the pure
    param dict of `UMT5Encoder` (numpy arrays in ``cfg.param_dtype``).

    Raises ``KeyError`` for a missing key and ``ValueError`` for a wrong shape or unexpected keys, naming the
    source, key, expected and actual values.
    """
    layout = layout or detect_layout(sd)
    if layout not in (OFFICIAL, HF):
        raise ValueError(f"{source}: unknown layout {layout!r}; expected {OFFICIAL!r} or {HF!r}")
    want = _abstract_params(cfg)
    pdt = np.dtype(cfg.param_dtype)
    used: set[str] = set()

    def fetch(key: str, expected_torch_shape: tuple[int, ...]) -> np.ndarray:
        if key not in sd:
            raise KeyError(
                f"{source}: missing key {key!r} ({layout} layout), expected a tensor of shape {expected_torch_shape}"
            )
        arr = sd[key]
        got = tuple(arr.shape)
        if got != expected_torch_shape:
            raise ValueError(
                f"{source}: key {key!r} has shape {got}, expected {expected_torch_shape} "
                f"(config: dim={cfg.dim}, dim_attn={cfg.dim_attn}, dim_ffn={cfg.dim_ffn}, "
                f"heads={cfg.num_heads}, buckets={cfg.num_buckets}, vocab={cfg.vocab_size})"
            )
        used.add(key)
        return np.asarray(arr)

    out: dict = {}
    # embedding
    embed_keys = _EMBED_KEYS[layout]
    ekey = next((k for k in embed_keys if k in sd), embed_keys[0])
    out["embedding"] = fetch(ekey, tuple(want["embedding"].shape)).astype(pdt, copy=False)
    if layout == HF:  # the tied copy, if present, must agree in shape and is otherwise ignored
        for k in embed_keys:
            if k in sd and k != ekey:
                fetch(k, tuple(want["embedding"].shape))
    out["norm"] = {"scale": fetch(_NORM_KEY[layout], tuple(want["norm"]["scale"].shape)).astype(pdt, copy=False)}

    blocks: dict = {}
    prefix = _LAYER_PREFIX[layout]
    for path, (okey, hkey, is_linear) in _LAYER_KEYS.items():
        target = want["blocks"]
        for p in path:
            target = target[p]
        stacked_shape = tuple(target.shape)  # (L, ...)
        layer_shape = stacked_shape[1:]
        torch_shape = layer_shape[::-1] if is_linear else layer_shape
        buf = np.empty(stacked_shape, pdt)
        suffix = okey if layout == OFFICIAL else hkey
        for i in range(cfg.num_layers):
            a = fetch(prefix.format(i=i) + suffix, torch_shape)
            buf[i] = a.T if is_linear else a
        node = blocks
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = buf
    out["blocks"] = blocks

    extra = sorted(set(sd) - used)
    if extra:
        more = f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""
        raise ValueError(
            f"{source}: {len(extra)} unexpected keys for a {cfg.num_layers}-layer UMT5 encoder "
            f"({layout} layout): {extra[:8]}{more}"
        )
    return out


def encoder_from_params(cfg: T5Config, params: Mapping[str, Any]) -> UMT5Encoder:
    """Build a `UMT5Encoder` whose parameters are ``params`` (a pure dict as from `params_from_state_dict`)."""
    abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    want = nnx.to_pure_dict(state)
    flat_want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want)}
    flat_got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(dict(params))}
    missing = sorted(set(flat_want) - set(flat_got))
    extra = sorted(set(flat_got) - set(flat_want))
    if missing or extra:
        raise ValueError(f"encoder_from_params: param tree mismatch; missing {missing[:8]}, unexpected {extra[:8]}")
    for k, w in flat_want.items():
        if tuple(flat_got[k].shape) != tuple(w.shape):
            raise ValueError(
                f"encoder_from_params: param {k} has shape {tuple(flat_got[k].shape)}, expected {tuple(w.shape)}"
            )
    arrays = jax.tree.map(lambda a: jnp.asarray(a, dtype=cfg.param_dtype), dict(params))
    nnx.replace_by_pure_dict(state, arrays)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------------- entry


def _find_hf_config(folder: str) -> dict | None:
    p = os.path.join(folder, "config.json")
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from None
    return None


def load_t5_encoder(
    path: str | os.PathLike,
    cfg: T5Config | None = None,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    reader: Callable[[str], Mapping[str, Any]] | None = None,
) -> UMT5Encoder:
    """Load a UMT5 encoder from an official ``.pth`` file, a ``.safetensors`` file, or a folder of
    ``*.safetensors`` (transformers / diffusers ``text_encoder/``, config taken from its ``config.json``).

    ``cfg`` defaults to the config read from ``config.json`` (hf) or inferred from the tensor shapes (official);
    ``dtype`` / ``param_dtype`` override the compute / storage dtypes (default: bf16 / bf16).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path}: T5 checkpoint not found (expected models_t5_umt5-xxl-enc-bf16.pth or "
            "a text_encoder/ folder with *.safetensors)"
        )
    hf_cfg = None
    if reader is not None:
        sd = reader(path)
    elif path.endswith((".pth", ".pt", ".bin")):
        sd = read_official_pth(path)
    else:
        sd = read_safetensors(path)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        hf_cfg = _find_hf_config(folder)
    layout = detect_layout(sd)
    if cfg is None:
        if layout == HF and hf_cfg is not None:
            cfg = config_from_hf_dict(hf_cfg, source=os.path.join(path, "config.json"))
        elif layout == OFFICIAL:
            cfg = config_from_official_state(sd)
        else:
            cfg = _config_from_hf_shapes(sd)
    over = {}
    if dtype is not None:
        over["dtype"] = dtype
    if param_dtype is not None:
        over["param_dtype"] = param_dtype
    if over:
        cfg = cfg.replace(**over)
    params = params_from_state_dict(sd, cfg, layout, source=path)
    return encoder_from_params(cfg, params)


def _config_from_hf_shapes(sd: Mapping[str, Any]) -> T5Config:
    """Infer a `T5Config` from an HF-layout state dict when no config.json is at hand."""

    def shape(k):
        if k not in sd:
            raise KeyError(
                f"hf T5 state dict: missing key {k!r} (needed to infer the config; "
                "or put the model's config.json beside the weights)"
            )
        return tuple(sd[k].shape)

    vocab, dim = shape("shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight")
    n = 0
    while f"encoder.block.{n}.layer.0.layer_norm.weight" in sd:
        n += 1
    p = "encoder.block.0.layer."
    buckets, heads = shape(p + "0.SelfAttention.relative_attention_bias.weight")
    return UMT5_XXL.replace(
        vocab_size=vocab,
        dim=dim,
        dim_attn=shape(p + "0.SelfAttention.q.weight")[0],
        dim_ffn=shape(p + "1.DenseReluDense.wi_1.weight")[0],
        num_heads=heads,
        num_layers=n,
        num_buckets=buckets,
    )
