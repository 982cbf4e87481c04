"""Orbax cache: convert -> load round trip, atomicity of convert, cache errors, and the ``wanjax convert`` CLI."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from test_io_common import official_cfg_json, tiny_cfg
from wanjax.cli import main
from wanjax.io import CheckpointError, convert, load_dit
from wanjax.io.keymap import official_shapes

CFG = tiny_cfg(layers=2)


@pytest.fixture()
def src(tmp_path) -> str:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    d = tmp_path / "high_noise_model"
    d.mkdir()
    save_file(
        {k: rng.standard_normal(s).astype(np.float32) for k, s in official_shapes(CFG).items()},
        str(d / "diffusion_pytorch_model.safetensors"),
    )
    (d / "config.json").write_text(json.dumps(official_cfg_json(CFG)))
    return str(d)


def _leaves(dit) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(dit, nnx.Param)))[0]
    return {jax.tree_util.keystr(p): v for p, v in flat}


def _assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert set(la) == set(lb) and len(la) == 42
    for k in la:
        assert la[k].dtype == lb[k].dtype and la[k].shape == lb[k].shape, k
        np.testing.assert_array_equal(np.asarray(la[k]), np.asarray(lb[k]), err_msg=k)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_round_trip(tmp_path, src, dtype):
    dst = convert(src, tmp_path / "cache", dtype)
    assert sorted(os.listdir(tmp_path)) == ["cache", "high_noise_model"]  # no temp dir left behind
    cached = load_dit(dst, dtype)
    assert cached.cfg == CFG
    _assert_same(cached, load_dit(src, dtype))  # identical params => identical outputs


def test_load_cache_in_other_dtype_and_compressed(tmp_path, src):
    dst = convert(src, tmp_path / "cache", jnp.float32, compress=True)
    assert json.load(open(os.path.join(dst, "wanjax_dit.json")))["compressed"] is True
    _assert_same(load_dit(dst, jnp.bfloat16), load_dit(src, jnp.bfloat16))


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_convert_leaves_nothing(tmp_path, src, monkeypatch, exc):
    real_save = ocp.Checkpointer.save

    def failing_save(self, directory, *a, **kw):
        real_save(self, directory, *a, **kw)  # params fully written into the temp dir ...
        raise exc  # ... then the process is interrupted before the rename

    monkeypatch.setattr(ocp.Checkpointer, "save", failing_save)
    with pytest.raises(type(exc)):
        convert(src, tmp_path / "cache")
    assert sorted(os.listdir(tmp_path)) == ["high_noise_model"]


def test_interrupted_overwrite_keeps_old_cache(tmp_path, src, monkeypatch):
    dst = convert(src, tmp_path / "cache", jnp.float32)
    before = _leaves(load_dit(dst, jnp.float32))
    monkeypatch.setattr(ocp.Checkpointer, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        convert(src, dst, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["cache", "high_noise_model"]
    after = _leaves(load_dit(dst, jnp.float32))
    assert all(np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)


def test_existing_destination(tmp_path, src):
    (tmp_path / "cache").mkdir()
    with pytest.raises(FileExistsError, match="destination exists"):
        convert(src, tmp_path / "cache")
    convert(src, tmp_path / "cache", overwrite=True)
    assert load_dit(tmp_path / "cache").cfg == CFG
    with pytest.raises(CheckpointError, match="already a converted wanjax cache"):
        convert(tmp_path / "cache", tmp_path / "again")


def test_broken_cache(tmp_path, src):
    dst = convert(src, tmp_path / "cache")
    with pytest.raises(CheckpointError, match="the cache holds config"):
        load_dit(dst, config=CFG.replace(num_layers=3))
    (tmp_path / "cache" / "wanjax_dit.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="expected format 'wanjax-dit' version 1"):
        load_dit(dst)


def test_cli_convert(tmp_path, src, capsys):
    assert main(["convert", src, str(tmp_path / "c"), "--dtype", "float32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_dit(tmp_path / "c", jnp.float32).blocks.ffn.fc1.kernel[...].dtype == jnp.float32
    assert main(["convert", str(tmp_path / "absent"), str(tmp_path / "d")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_load_into_sharding(tmp_path, src):
    """Both paths place every parameter with the given sharding (replicated over all host devices here)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("d",))
    rep = NamedSharding(mesh, P())
    dst = convert(src, tmp_path / "cache")
    for dit in (load_dit(src, sharding=rep), load_dit(dst, sharding=rep)):
        leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(dit, nnx.Param)))
        assert leaves and all(x.sharding.is_equivalent_to(rep, x.ndim) for x in leaves)
    _assert_same(load_dit(src, sharding=rep), load_dit(dst, sharding=rep))


def test_grouped_restore(tmp_path, src, monkeypatch):
    """Restoring in many small groups (partial restores) gives the same parameters as one restore."""
    import wanjax.io.orbax_cache as oc

    dst = convert(src, tmp_path / "cache")
    whole = load_dit(dst)
    monkeypatch.setattr(oc, "RESTORE_GROUP_BYTES", 1000)
    calls = []
    real = ocp.Checkpointer.restore
    monkeypatch.setattr(ocp.Checkpointer, "restore", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    _assert_same(load_dit(dst), whole)
    assert len(calls) > 10
