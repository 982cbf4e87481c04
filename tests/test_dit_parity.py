"""Parity: diffusers `WanTransformer3DModel` (PyTorch, fp32) vs wanjax `WanDiT` loaded by `load_dit` from the
diffusers layout and from the same weights renamed to the official layout (keymap)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from test_io_common import diffusers_model, state_dict, tiny_cfg, write_checkpoint
from wanjax.io import load_dit

# (config kwargs, batch, latent F, H, W, text tokens, timesteps)
CASES = [
    pytest.param(
        dict(dim=32, heads=2, layers=2, ffn=48, text_dim=24, freq=16, text_len=8),
        1,
        3,
        6,
        10,
        5,
        [999.0],
        id="d32-h2-odd-grid",
    ),
    pytest.param(
        dict(dim=48, heads=4, layers=3, ffn=40, text_dim=20, freq=32, text_len=6),
        2,
        1,
        2,
        14,
        6,
        [901.0, 37.0],
        id="d48-h4-b2",
    ),
    pytest.param(
        dict(dim=256, heads=2, layers=1, ffn=64, text_dim=16, freq=256, text_len=12),
        1,
        5,
        2,
        6,
        3,
        [500.0],
        id="d256-headdim128",
    ),
]


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("kw,batch,f,h,w,ltxt,ts", CASES)
def test_parity_both_layouts(tmp_path, kw, batch, f, h, w, ltxt, ts):
    cfg = tiny_cfg(**kw)
    m = diffusers_model(cfg, seed=kw["dim"])
    sd = state_dict(m)
    rng = np.random.default_rng(kw["dim"])
    x = rng.standard_normal((batch, f, h, w, cfg.in_dim), dtype=np.float32)
    t = np.asarray(ts, np.float32)
    ctx = rng.standard_normal((batch, ltxt, cfg.text_dim), dtype=np.float32)

    ctx_pad = np.zeros((batch, cfg.text_len, cfg.text_dim), np.float32)  # Wan pads to text_len; diffusers doesn't
    ctx_pad[:, :ltxt] = ctx
    with torch.no_grad():
        ref = m(
            hidden_states=torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()),
            timestep=torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(ctx_pad),
            return_dict=False,
        )[0]
    ref = ref.numpy().transpose(0, 2, 3, 4, 1)  # [B, F, H, W, 16]

    outs = {}
    for layout in ("diffusers", "official"):
        path = write_checkpoint(sd, str(tmp_path / f"{layout}.safetensors"), layout=layout)
        dit = load_dit(path, dtype=jnp.float32, config=cfg)
        y = dit(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))
        assert y.dtype == jnp.float32 and y.shape == (batch, f, h, w, cfg.out_dim)
        outs[layout] = np.asarray(y)
        err = _rel_err(outs[layout], ref)
        print(f"{layout}: max relative error {err:.3g}")
        assert err <= 1e-5, f"{layout}: max relative error {err:.3g} > 1e-5"
    np.testing.assert_array_equal(outs["diffusers"], outs["official"])
    assert np.max(np.abs(ref)) > 0.1  # the comparison is not against a trivially small output
