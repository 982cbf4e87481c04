"""`load_dit` path forms (official dir, diffusers dir, index json, single/ComfyUI file), on-disk dtypes, dtype policy,
and exact values of every converted parameter."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from test_io_common import diffusers_model, official_cfg_json, state_dict, tiny_cfg, write_checkpoint
from wanjax.io import keymap, load_dit

CFG = tiny_cfg(dim=32, heads=2, layers=3, ffn=48, text_dim=24, freq=16, text_len=8)


@pytest.fixture(scope="module")
def sd():
    return state_dict(diffusers_model(CFG, seed=3))


def _params(dit) -> dict:
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(dit, nnx.Param)))[0]
    return {tuple(str(k.key) for k in p): np.asarray(v) for p, v in flat}


def _expected(sd, dtype) -> dict:
    """Reference conversion written independently of the loader: per official key, torch ops then stack."""
    out: dict = {}
    for k, v in sd.items():
        name = keymap.diffusers_to_official(k)
        t = keymap.official_to_wanjax(name)
        w = v.float()
        if t.kind == "linear":
            w = w.t()
        elif t.kind == "patch":  # kernel[(ph*2+pw)*C + c, o] = w[o, c, 0, ph, pw]
            w = w[:, :, 0].permute(2, 3, 1, 0).reshape(-1, w.shape[0])
        keep32 = (
            t.path[0] in ("time_embedding", "head")
            or "modulation" in t.path
            or any(p.startswith("norm") for p in t.path)
        )
        w = w if keep32 else w.to(dtype)
        if t.layer is None:
            out[t.path] = w
        else:
            out.setdefault(t.path, [None] * CFG.num_layers)[t.layer] = w
    res = {}
    for p, w in out.items():
        w = torch.stack(w) if isinstance(w, list) else w
        res[p] = w.float().numpy() if w.dtype == torch.bfloat16 else w.numpy()
    return res


def _assert_params(dit, sd, dtype):
    got = _params(dit)
    want = _expected(sd, dtype)
    assert set(got) == set(want)
    for p in want:
        g = got[p].astype(np.float32)
        assert g.shape == want[p].shape, p
        np.testing.assert_array_equal(g, want[p], err_msg="/".join(p))


def test_official_expert_dir(tmp_path, sd):
    d = write_checkpoint(sd, str(tmp_path / "high_noise_model"), layout="official", shards=3, config=CFG)
    dit = load_dit(d, jnp.float32)
    assert dit.cfg == CFG  # from config.json (official fields, incl. text_len)
    _assert_params(dit, sd, torch.float32)


def test_diffusers_transformer_dir_and_index(tmp_path, sd):
    d = write_checkpoint(sd, str(tmp_path / "transformer_2"), layout="diffusers", shards=2, config=CFG)
    dit = load_dit(d, jnp.float32)
    assert dit.cfg == CFG.replace(text_len=512)  # diffusers config.json has no text_len
    _assert_params(dit, sd, torch.float32)
    dit2 = load_dit(f"{d}/diffusion_pytorch_model.safetensors.index.json", jnp.float32, config=CFG)
    _assert_params(dit2, sd, torch.float32)


def test_comfy_single_file_bf16_default(tmp_path, sd):
    p = write_checkpoint(sd, str(tmp_path / "wan_comfy.safetensors"), layout="official", comfy=True)
    (tmp_path / "config.json").write_text(json.dumps(official_cfg_json(CFG)))
    dit = load_dit(p)  # bf16 default: big weights bf16, fp32 policy elsewhere
    assert dit.cfg == CFG
    _assert_params(dit, sd, torch.bfloat16)  # fp32 -> bf16 rounding identical to torch (nearest even)
    assert dit.blocks.self_attn.q.kernel[...].dtype == jnp.bfloat16
    assert dit.blocks.norm3.scale[...].dtype == jnp.float32
    assert dit.head.head.kernel[...].dtype == jnp.float32


@pytest.mark.parametrize("disk", [torch.bfloat16, torch.float16])
def test_half_precision_on_disk(tmp_path, sd, disk):
    p = write_checkpoint(sd, str(tmp_path / "m.safetensors"), layout="diffusers", dtype=disk)
    dit = load_dit(p, jnp.float32, config=CFG)
    _assert_params(dit, {k: v.to(disk) for k, v in sd.items()}, torch.float32)


def test_config_inferred_from_shapes(tmp_path):
    cfg = tiny_cfg(dim=128, heads=1, layers=2, ffn=64, text_dim=16, freq=32)
    small = state_dict(diffusers_model(cfg, seed=5))
    p = write_checkpoint(small, str(tmp_path / "lone.safetensors"), layout="official", comfy=True)
    dit = load_dit(p, jnp.float32)
    assert dit.cfg == cfg.replace(text_len=512)
    assert dit.blocks.ffn.fc1.kernel[...].shape == (2, 128, 64)


def test_chunked_reading_gives_same_params(tmp_path, sd, monkeypatch):
    """Row-block reads of large tensors (forced tiny here) and frequent re-mapping give identical parameters."""
    import wanjax.io.dit_params as dl

    p = write_checkpoint(sd, str(tmp_path / "m.safetensors"), layout="official")
    monkeypatch.setattr(dl, "CHUNK_BYTES", 200)
    monkeypatch.setattr(dl, "REOPEN_BYTES", 1000)
    calls = []
    real = dl.iter_chunks

    def spy(*a, **kw):
        for item in real(*a, **kw):
            calls.append((item[0].key, item[1]))
            yield item

    monkeypatch.setattr(dl, "iter_chunks", spy)
    _assert_params(load_dit(p, jnp.float32, config=CFG), sd, torch.float32)
    starts = [s for k, s in calls if k == "blocks.1.ffn.0.weight"]
    assert len(starts) > 1 and starts[0] == 0 and starts == sorted(starts)  # really read in row blocks
    assert [s for k, s in calls if k == "patch_embedding.weight"] == [0]  # the conv is read whole


def test_streaming_host_memory(tmp_path, monkeypatch):
    """Reading holds the converted buffers plus about one chunk: traced peak <= 1.1x the converted expert
    (a loader that kept whole source tensors or the fp32 checkpoint around would be >= 2x)."""
    import math
    import tracemalloc

    from safetensors.numpy import save_file

    import wanjax.io.dit_params as dl
    from wanjax.io.dit_source import resolve

    cfg = tiny_cfg(dim=256, heads=2, layers=4, ffn=1024, text_dim=256, freq=64)
    rng = np.random.default_rng(0)
    p = str(tmp_path / "m.safetensors")
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in keymap.official_shapes(cfg).items()}, p)
    converted = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in dl.target_tree(cfg, jnp.bfloat16).values())
    monkeypatch.setattr(dl, "CHUNK_BYTES", 128 << 10)
    tracemalloc.start()
    try:
        _, bufs = dl.read_safetensors_params(resolve(p), jnp.bfloat16, config=cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(b.nbytes for b in bufs.values()) == converted
    assert peak <= 1.1 * converted, f"peak traced host memory {peak / converted:.2f}x the converted expert"


def test_copy_transposed_blocks_bit_exact():
    """The threaded, blocked transpose of the loader equals numpy's ``src.T`` bit for bit: bf16 with a row count that
    is not a multiple of the block, into a column slice of a larger buffer (the loader's row-chunked case), and a
    casting copy (fp32 -> bf16) that takes the plain path."""
    import ml_dtypes
    import numpy as np

    from wanjax.io.dit_params import TRANSPOSE_BLOCK_ROWS, copy_transposed

    rng = np.random.default_rng(0)
    src = rng.standard_normal((2 * TRANSPOSE_BLOCK_ROWS + 37, 48)).astype(ml_dtypes.bfloat16)
    buf = np.zeros((48, src.shape[0] + 10), ml_dtypes.bfloat16)
    copy_transposed(buf[:, 5 : 5 + src.shape[0]], src)
    assert np.array_equal(buf[:, 5 : 5 + src.shape[0]].view(np.uint16), src.T.view(np.uint16))
    assert not buf[:, :5].view(np.uint16).any() and not buf[:, -5:].view(np.uint16).any()
    src32 = rng.standard_normal((300, 16)).astype(np.float32)
    out = np.empty((16, 300), ml_dtypes.bfloat16)
    copy_transposed(out, src32)
    assert np.array_equal(out.view(np.uint16), src32.T.astype(ml_dtypes.bfloat16).view(np.uint16))
    with pytest.raises(ValueError, match="not the transpose"):
        copy_transposed(np.empty((3, 4), np.float32), np.empty((3, 4), np.float32))
