"""Key maps official <-> diffusers <-> wanjax, layout detection, and the full-size expert's shapes (no weights)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_io_common import diffusers_model, state_dict, tiny_cfg
from wanjax.config import I2V_A14B
from wanjax.io import keymap
from wanjax.io.dit_params import target_tree


def test_rename_examples():
    o2d = keymap.official_to_diffusers
    assert o2d("blocks.7.self_attn.q.weight") == "blocks.7.attn1.to_q.weight"
    assert o2d("blocks.7.self_attn.o.bias") == "blocks.7.attn1.to_out.0.bias"
    assert o2d("blocks.0.cross_attn.norm_k.weight") == "blocks.0.attn2.norm_k.weight"
    assert o2d("blocks.3.norm3.weight") == "blocks.3.norm2.weight"  # the swap
    assert o2d("blocks.3.norm3.bias") == "blocks.3.norm2.bias"
    assert o2d("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert o2d("blocks.12.modulation") == "blocks.12.scale_shift_table"
    assert o2d("blocks.1.ffn.0.weight") == "blocks.1.ffn.net.0.proj.weight"
    assert o2d("blocks.1.ffn.2.bias") == "blocks.1.ffn.net.2.bias"
    assert o2d("head.modulation") == "scale_shift_table"
    assert o2d("head.head.weight") == "proj_out.weight"
    assert o2d("time_projection.1.bias") == "condition_embedder.time_proj.bias"
    assert o2d("text_embedding.2.weight") == "condition_embedder.text_embedder.linear_2.weight"
    assert o2d("time_embedding.0.bias") == "condition_embedder.time_embedder.linear_1.bias"
    assert o2d("patch_embedding.weight") == "patch_embedding.weight"
    for bad in (
        "blocks.0.self_attn.q.scale",
        "img_emb.proj.0.weight",
        "blocks.0.cross_attn.k_img.weight",
        "head.norm.weight",
        "blocks.x.norm3.weight",
        "modulation",
    ):
        with pytest.raises(KeyError, match="not an official"):
            o2d(bad)
    with pytest.raises(KeyError, match="not a diffusers"):
        keymap.diffusers_to_official("blocks.0.attn2.add_k_proj.weight")


def test_diffusers_state_dict_round_trip():
    """Every key of a real diffusers model maps to an official key of the expected set and back."""
    cfg = tiny_cfg(layers=3)
    sd = state_dict(diffusers_model(cfg))
    official = {keymap.diffusers_to_official(k): tuple(v.shape) for k, v in sd.items()}
    assert official == keymap.official_shapes(cfg)
    assert {keymap.official_to_diffusers(k) for k in official} == set(sd)


def test_layout_detection():
    off = list(keymap.official_shapes(tiny_cfg()))
    dif = [keymap.official_to_diffusers(k) for k in off]
    assert keymap.detect_layout(off) == ("official", False)
    assert keymap.detect_layout(dif) == ("diffusers", False)
    assert keymap.detect_layout([keymap.COMFY_PREFIX + k for k in off]) == ("official", True)
    assert keymap.to_official(keymap.COMFY_PREFIX + "blocks.1.norm3.bias", "official", True) == "blocks.1.norm3.bias"
    assert keymap.to_official("blocks.1.norm2.bias", "diffusers", False) == "blocks.1.norm3.bias"
    assert keymap.to_official("blocks.1.foo.weight", "official", False) is None
    assert keymap.to_official("blocks.1.attn1.to_q.weight", "official", False) is None
    assert "blocks.1.norm2.bias" not in keymap.official_shapes(tiny_cfg())  # official norm2 has no params
    with pytest.raises(ValueError, match="mix the official layout"):
        keymap.detect_layout(off + ["blocks.0.attn1.to_q.weight"])
    with pytest.raises(ValueError, match="ComfyUI prefix"):
        keymap.detect_layout([keymap.COMFY_PREFIX + off[0]] + off[1:])
    with pytest.raises(ValueError, match="no Wan2.2 DiT key"):
        keymap.detect_layout(["encoder.block.0.layer.0.weight"])


def test_patch_kernel_layout():
    """kernel[(ph*2+pw)*C + c, o] == w[o, c, 0, ph, pw] (the order WanDiT.patchify produces)."""
    o, c = 5, 3
    w = np.random.default_rng(0).standard_normal((o, c, 1, 2, 2)).astype(np.float32)
    k = keymap.convert_tensor("patch", w)
    assert k.shape == (4 * c, o)
    for ph in range(2):
        for pw in range(2):
            for ci in range(c):
                np.testing.assert_array_equal(k[(ph * 2 + pw) * c + ci], w[:, ci, 0, ph, pw])
    lin = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(keymap.convert_tensor("linear", lin), lin.T)


def test_full_size_expert_shapes():
    """I2V_A14B: 14,288,901,184 params; the official key set maps onto WanDiT's tree exactly (no allocation)."""
    shapes = keymap.official_shapes(I2V_A14B)
    assert sum(math.prod(s) for s in shapes.values()) == 14_288_901_184
    assert len(shapes) == 40 * 27 + 15
    assert shapes["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
    assert shapes["time_projection.1.weight"] == (30720, 5120)
    assert shapes["blocks.39.ffn.0.weight"] == (13824, 5120)
    assert shapes["head.head.weight"] == (64, 5120)
    assert "blocks.40.modulation" not in shapes and "blocks.0.norm2.weight" not in shapes
    target = target_tree(I2V_A14B, jnp.bfloat16)  # nnx.eval_shape of WanDiT; raises if keymap disagrees
    assert sum(math.prod(s.shape) for s in target.values()) == 14_288_901_184
    assert set(target) == set(keymap.wanjax_shapes(I2V_A14B))
    # every official key lands on exactly one (path, layer) slot, and every slot is covered once
    slots = [(t.path, t.layer) for t in map(keymap.official_to_wanjax, shapes)]
    assert len(set(slots)) == len(slots)
    covered = {}
    for p, layer in slots:
        covered[p] = covered.get(p, 0) + 1
    assert all(covered[p] == (40 if p[0] == "blocks" else 1) for p in target)
    # dtype policy: fp32 for time_embedding, head, modulation tables and norms; bf16 for the rest
    for p, s in target.items():
        fp32 = p[0] in ("time_embedding", "head") or "modulation" in p or any(n.startswith("norm") for n in p)
        assert s.dtype == (jnp.float32 if fp32 else jnp.bfloat16), (p, s.dtype)
    assert jax.tree.leaves(target) and target[("blocks", "modulation")].shape == (40, 1, 6, 5120)
