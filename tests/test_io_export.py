"""save_dit / export_state_dict: the inverse of load_dit, in both layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.io.dit_loader import load_dit
from wanjax.io.export import export_state_dict, save_dit
from wanjax.io.keymap import official_shapes
from wanjax.model.dit import WanDiT


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_save_then_load_roundtrip(tmp_path, layout):
    m = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    out = save_dit(m, tmp_path / "expert", layout=layout, max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "expert").iterdir())
    assert "config.json" in files and "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # really sharded
    m2 = load_dit(out, dtype=jnp.float32)
    a = nnx.state(m, nnx.Param).to_pure_dict()
    b = nnx.state(m2, nnx.Param).to_pure_dict()
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_export_keys_and_shapes():
    m = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    sd = export_state_dict(m)
    want = official_shapes(TINY)
    assert set(sd) == set(want)
    assert all(sd[k].shape == want[k] for k in want)


def test_refuses_to_overwrite(tmp_path):
    m = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_dit(m, tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
