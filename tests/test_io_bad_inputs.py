"""Unusable checkpoints raise clear errors naming file, key, expected and actual (see docs/bad_inputs.md)."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from test_io_common import tiny_cfg
from wanjax.io import CheckpointError, load_dit
from wanjax.io.keymap import official_shapes, official_to_diffusers

CFG = tiny_cfg(layers=1)


def _tensors(cfg=CFG, layout="official") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for k, s in official_shapes(cfg).items():
        out[official_to_diffusers(k) if layout == "diffusers" else k] = rng.standard_normal(s).astype(np.float32)
    return out


def _write(tmp_path, tensors, name="m.safetensors") -> str:
    p = str(tmp_path / name)
    save_file(tensors, p)
    return p


def _load(path, **kw):
    return load_dit(path, jnp.float32, config=kw.pop("config", CFG), **kw)


def _refused(tmp_path, tensors, match):
    """Loading a checkpoint of ``tensors`` raises `CheckpointError` matching ``match``."""
    with pytest.raises(CheckpointError, match=match):
        _load(_write(tmp_path, tensors))


def test_good_file_loads(tmp_path):
    dit = _load(_write(tmp_path, _tensors()))
    assert dit.blocks.modulation[...].shape == (1, 1, 6, CFG.dim)


@pytest.mark.parametrize("cut", [1, 1000, "header"])
def test_truncated_file(tmp_path, cut):
    p = _write(tmp_path, _tensors())
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[:4] if cut == "header" else data[:-cut])
    with pytest.raises(CheckpointError, match="truncated") as e:
        _load(p)
    assert p in str(e.value)


def test_missing_key(tmp_path):
    t = _tensors(layout="diffusers")
    del t["blocks.0.attn2.to_v.bias"]
    _refused(tmp_path, t, r"1 expected key\(s\) missing: 'blocks.0.attn2.to_v.bias'")


def test_extra_key_and_ignore_unknown(tmp_path):
    t = _tensors()
    t["blocks.0.cross_attn.k_img.weight"] = np.zeros((CFG.dim, CFG.dim), np.float32)
    t["blocks.1.modulation"] = np.zeros((1, 6, CFG.dim), np.float32)  # a layer beyond num_layers
    p = _write(tmp_path, t)
    with pytest.raises(CheckpointError, match="2 unknown key") as e:
        _load(p)
    assert "blocks.0.cross_attn.k_img.weight" in str(e.value) and "blocks.1.modulation" in str(e.value)
    assert "ignore_unknown=True" in str(e.value)
    dit = _load(p, ignore_unknown=True)
    np.testing.assert_array_equal(np.asarray(dit.blocks.modulation[...][0]), t["blocks.0.modulation"])


def test_wrong_shape(tmp_path):
    t = _tensors()
    t["blocks.0.ffn.0.weight"] = t["blocks.0.ffn.0.weight"][:-1]
    p = _write(tmp_path, t)
    with pytest.raises(CheckpointError) as e:
        _load(p)
    msg = str(e.value)
    assert p in msg and "'blocks.0.ffn.0.weight'" in msg
    assert f"expected shape ({CFG.ffn_dim}, {CFG.dim}), got ({CFG.ffn_dim - 1}, {CFG.dim})" in msg


def test_wrong_shape_names_official_key_for_diffusers(tmp_path):
    t = _tensors(layout="diffusers")
    t["blocks.0.norm2.weight"] = np.ones((CFG.dim + 1,), np.float32)
    _refused(
        tmp_path,
        t,
        r"'blocks.0.norm2.weight' \(official 'blocks.0.norm3.weight'\): expected shape \(32,\), got \(33,\)",
    )


def test_wrong_dtype(tmp_path):
    t = _tensors()
    t["head.modulation"] = t["head.modulation"].astype(np.int32)
    _refused(tmp_path, t, r"key 'head.modulation': expected a float dtype \(F32/BF16/F16\), got I32")


def test_several_problems_reported_together(tmp_path):
    t = _tensors()
    del t["patch_embedding.bias"]
    t["time_embedding.0.bias"] = t["time_embedding.0.bias"].astype(np.int64)
    t["junk"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        _load(_write(tmp_path, t))
    assert len(e.value.problems) == 3


def _sharded(tmp_path) -> str:
    d = tmp_path / "expert"
    d.mkdir()
    t = _tensors()
    keys = list(t)
    save_file({k: t[k] for k in keys[::2]}, str(d / "s-1.safetensors"))
    save_file({k: t[k] for k in keys[1::2]}, str(d / "s-2.safetensors"))
    wm = {k: ("s-1.safetensors" if i % 2 == 0 else "s-2.safetensors") for i, k in enumerate(keys)}
    (d / "m.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return str(d / "m.safetensors.index.json")


def test_sharded_index_ok(tmp_path):
    assert _load(_sharded(tmp_path)).cfg == CFG


@pytest.mark.parametrize(
    "content,match",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "cannot read index file"),
        (b'{"metadata": {}}', "'weight_map' object"),
        (b'{"weight_map": {"a": 3}}', "'weight_map' object"),
        (b'{"weight_map": {"patch_embedding.bias": "nope.safetensors"}}', r"do not exist: \[.*nope.safetensors"),
    ],
)
def test_bad_index(tmp_path, content, match):
    p = tmp_path / "x.safetensors.index.json"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        _load(str(p))
    assert str(p) in str(e.value)


def test_unreadable_index(tmp_path, monkeypatch):
    import builtins

    p = _sharded(tmp_path)
    real_open = builtins.open

    def fake_open(file, *a, **kw):  # root ignores chmod, so simulate "permission denied"
        if os.fspath(file) == p:
            raise PermissionError(13, "Permission denied", p)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(CheckpointError, match="cannot read index file \\(Permission denied\\)") as e:
        _load(p)
    assert p in str(e.value)


def test_index_disagrees_with_shards(tmp_path):
    p = _sharded(tmp_path)
    idx = json.load(open(p))
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "s-2.safetensors" if idx["weight_map"][k] == "s-1.safetensors" else "s-1.safetensors"
    json.dump(idx, open(p, "w"))
    with pytest.raises(CheckpointError, match="index and shard files disagree") as e:
        _load(p)
    assert k in str(e.value)


def test_duplicate_key_across_shards(tmp_path):
    d = tmp_path / "dup"
    d.mkdir()
    t = _tensors()
    save_file(t, str(d / "a.safetensors"))
    save_file({"head.modulation": t["head.modulation"]}, str(d / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"'head.modulation' is present 2 times .*expected exactly once"):
        load_dit_files(d, ["a.safetensors", "b.safetensors"])


def load_dit_files(d, files):
    """Scan/validate an explicit file list (an index-free multi-file set) through the loader internals."""
    from wanjax.io.dit_params import read_safetensors_params
    from wanjax.io.dit_source import CheckpointSource

    src = CheckpointSource(str(d), "safetensors", tuple(str(d / f) for f in files))
    return read_safetensors_params(src, jnp.float32, config=CFG)


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_dit(str(tmp_path / "absent"))
    (tmp_path / "root" / "high_noise_model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"pass one of \['high_noise_model'\]"):
        load_dit(str(tmp_path / "root"))
    d = tmp_path / "many"
    d.mkdir()
    for i in range(2):
        save_file({"x": np.zeros(1, np.float32)}, str(d / f"{i}.safetensors"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors.index.json"):
        load_dit(str(d))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a directory"):
        load_dit(str(tmp_path / "w.bin"))


def test_not_a_wan_checkpoint(tmp_path):
    p = _write(tmp_path, {"encoder.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="no Wan2.2 DiT key"):
        _load(p)


def test_config_disagrees_with_weights(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    save_file(_tensors(), str(d / "m.safetensors"))
    (d / "config.json").write_text(
        json.dumps(
            {
                "dim": CFG.dim,
                "ffn_dim": CFG.ffn_dim,
                "num_heads": 2,
                "num_layers": 2,
                "text_dim": CFG.text_dim,
                "freq_dim": CFG.freq_dim,
            }
        )
    )
    with pytest.raises(CheckpointError, match=r"missing: 'blocks.1.modulation'"):
        load_dit(str(d), jnp.float32)


def test_cannot_infer_heads(tmp_path):
    p = _write(tmp_path, _tensors())  # dim 32: not a multiple of the assumed head_dim 128, no config.json
    with pytest.raises(CheckpointError, match="cannot infer num_heads: dim 32"):
        load_dit(p, jnp.float32)
    assert not os.path.exists(tmp_path / "config.json")
