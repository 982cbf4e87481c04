"""wanjax.lora on TINY configs: the published key formats give the same model, bad files give clear errors, the
smoothing / rotation fold of the W4A4 branch, W4A4 + LoRA fidelity, exact removal on a pipeline, the Lightning
preset. (The mini-model test with a trained LoRA is tests/test_lora_mini.py.)"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import wanjax.lora as L
from wanjax.config import TINY
from wanjax.generation_config import GenerationConfig
from wanjax.io.keymap import official_to_diffusers
from wanjax.model.dit import WanDiT
from wanjax.numerics.hadamard import hadamard_block_size, rotate_activations
from wanjax.quant.apply import get_submodule, qlinears
from wanjax.quant.qlinear import QLinear, qlinear_apply
from wanjax.quant.quantize import LayerInputs, quantize
from wanjax.quant.recipes import LowRank, Recipe, Rotate, RTN, Smooth
from wanjax.quant.rtn import ActQuantSpec, WeightQuantSpec

CFG = TINY
#: module (official, in a block) -> (K, N)
MODS = {
    "self_attn.q": (64, 64),
    "self_attn.o": (64, 64),
    "cross_attn.k": (64, 64),
    "ffn.0": (64, 128),
    "ffn.2": (128, 64),
}
#: the Linears quantized in the W4A4 expert (the LoRAs also touch self_attn.o and cross_attn.k, left in BF16)
QPATHS = ("blocks.self_attn.q", "blocks.ffn.fc1", "blocks.ffn.fc2")
#: a quick W4A4 recipe with every transform the LoRA fold must undo (smoothing, rotation, low-rank branch)
FAST = Recipe(
    "lora-test",
    WeightQuantSpec("int4"),
    ActQuantSpec("int4"),
    (Smooth(0.5), Rotate(0, 256), LowRank(8), RTN()),
)


def random_lora(rank=4, seed=0, scale=0.1, top=True):
    """{official module: (down [r, K], up [N, r], alpha)} over both blocks (+ head.head, time_projection.1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(CFG.num_layers):
        for m, (k, n) in MODS.items():
            out[f"blocks.{i}.{m}"] = (
                rng.standard_normal((rank, k)).astype(np.float32) * scale,
                rng.standard_normal((n, rank)).astype(np.float32) * scale,
                float(rank) / 2,
            )
    if top:
        p = 16 * 4  # out_dim x patch
        out["head.head"] = (rng.standard_normal((rank, 64)) * scale, rng.standard_normal((p, rank)) * scale, 2.0)
        out["time_projection.1"] = (
            rng.standard_normal((rank, 64)) * scale,
            rng.standard_normal((384, rank)) * scale,
            2.0,
        )
    return {k: (np.float32(d), np.float32(u), a) for k, (d, u, a) in out.items()}


def _diffusers_module(m):
    return official_to_diffusers(m + ".weight")[: -len(".weight")]


def write_layout(lora, layout):
    """The LoRA ``lora`` as a state dict (and header metadata) in a published layout."""
    sd, meta = {}, None
    for m, (d, u, a) in lora.items():
        if layout == "lightning":  # official release: diffusion_model. + lora_down/lora_up + alpha, float32
            b = f"diffusion_model.{m}"
            sd |= {f"{b}.lora_down.weight": d, f"{b}.lora_up.weight": u, f"{b}.alpha": np.asarray(a, np.float32)}
        elif layout == "official-noprefix-AB":  # native names with lora_A/lora_B (diffusers accepts it), fp16
            sd |= {
                f"{m}.lora_A.weight": d.astype(np.float16),
                f"{m}.lora_B.weight": u.astype(np.float16),
                f"{m}.alpha": np.asarray(a, np.float32),
            }
        elif layout == "diffusers":  # diffusers / PEFT: transformer. + diffusers names, alpha baked into the weights
            s = a / d.shape[0]
            b = f"transformer.{_diffusers_module(m)}"
            sd |= {f"{b}.lora_A.weight": d * np.float32(s), f"{b}.lora_B.weight": u}
        elif layout == "diffusers-metadata":  # diffusers >= 0.35: alpha in the header's lora_adapter_metadata
            b = f"transformer.{_diffusers_module(m)}"
            sd |= {f"{b}.lora_A.weight": d, f"{b}.lora_B.weight": u}
            meta = {"lora_adapter_metadata": json.dumps({"r": int(d.shape[0]), "lora_alpha": a})}
        elif layout == "peft":  # PEFT base_model.model. prefix, .default adapter names
            b = f"base_model.model.{m}"
            sd |= {
                f"{b}.lora_A.default.weight": d * np.float32(a / d.shape[0]),
                f"{b}.lora_B.default.weight": u,
            }
        elif layout == "kohya":  # kohya / musubi-tuner / ComfyUI: lora_unet_ + underscores + alpha
            b = "lora_unet_" + m.replace(".", "_")
            sd |= {f"{b}.lora_down.weight": d, f"{b}.lora_up.weight": u, f"{b}.alpha": np.asarray(a, np.float32)}
        elif layout == "comfy":  # ComfyUI "model.diffusion_model." + bf16-able fp32
            b = f"model.diffusion_model.{m}"
            sd |= {f"{b}.lora_down.weight": d, f"{b}.lora_up.weight": u, f"{b}.alpha": np.asarray(a, np.float32)}
        else:
            raise ValueError(layout)
    return sd, meta


LAYOUTS = ("lightning", "official-noprefix-AB", "diffusers", "diffusers-metadata", "peft", "kohya", "comfy")


@pytest.fixture(scope="module")
def f32_model():
    return WanDiT(CFG, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 2, 4, 4, CFG.in_dim)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 5, CFG.text_dim)), jnp.float32)
    return x, ctx


def _kernels(model):
    return {p: np.asarray(v, np.float32) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


# --------------------------------------------------------------------------------------------------- formats
def test_every_published_layout_loads_to_the_same_model(tmp_path, f32_model):
    lora = random_lora()
    merged = {}
    for layout in LAYOUTS:
        sd, meta = write_layout(lora, layout)
        path = tmp_path / f"{layout}.safetensors"
        save_file(sd, str(path), metadata=meta)
        lw = L.read_lora(path, CFG)
        assert set(lw.modules) == set(lora), layout
        merged[layout] = (lw.format, _kernels(L.lora_model(f32_model, [(lw, 1.0)])))
    ref_fmt, ref = merged["lightning"]
    assert ref_fmt.startswith("official (diffusion_model.; lora_down/lora_up, alpha")
    assert merged["kohya"][0].startswith("kohya") and merged["diffusers"][0].startswith("diffusers")
    base = _kernels(f32_model)
    changed = [p for p in ref if not np.array_equal(ref[p], base[p])]
    assert len(changed) == 5 + 2  # the 5 stacked block Linears + head.head + time_projection
    for layout, (_, k) in merged.items():
        tol = 2e-3 if layout == "official-noprefix-AB" else 1e-6  # fp16 tensors
        for p in ref:
            np.testing.assert_allclose(k[p], ref[p], atol=tol, err_msg=f"{layout} {p}")


def test_merge_is_alpha_over_rank_times_up_down(f32_model):
    lora = random_lora(top=False)
    sd, _ = write_layout(lora, "lightning")
    lw = L.parse_lora(sd, CFG)
    m = L.lora_model(f32_model, [(lw, 0.5)])
    d, u, a = lora["blocks.1.ffn.0"]
    want = np.asarray(f32_model.blocks.ffn.fc1.kernel[...])[1] + 0.5 * (a / 4) * (u @ d).T
    np.testing.assert_allclose(np.asarray(m.blocks.ffn.fc1.kernel[...])[1], want, atol=1e-6)
    # the model given is not modified (copies share Variables: the merge must not write into them)
    assert not np.allclose(np.asarray(f32_model.blocks.ffn.fc1.kernel[...])[1], want)


def test_bias_and_full_deltas(f32_model):
    rng = np.random.default_rng(2)
    db = rng.standard_normal(64).astype(np.float32)
    dn = rng.standard_normal(64).astype(np.float32)
    dm = rng.standard_normal((1, 6, 64)).astype(np.float32)
    sd = {
        "diffusion_model.blocks.0.self_attn.q.diff_b": db,
        "diffusion_model.blocks.1.norm3.diff": dn,
        "diffusion_model.blocks.1.diff_m": dm,
    }
    lw = L.parse_lora(sd, CFG)
    m = L.lora_model(f32_model, [(lw, 2.0)])
    np.testing.assert_allclose(m.blocks.self_attn.q.bias[...][0] - f32_model.blocks.self_attn.q.bias[...][0], 2 * db)
    np.testing.assert_allclose(m.blocks.norm3.scale[...][1] - f32_model.blocks.norm3.scale[...][1], 2 * dn, atol=1e-6)
    np.testing.assert_allclose(m.blocks.modulation[...][1] - f32_model.blocks.modulation[...][1], 2 * dm, atol=1e-6)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda sd: sd.pop("diffusion_model.blocks.0.ffn.0.lora_up.weight"), r"blocks\.0\.ffn\.0.*no up"),
        (
            lambda sd: sd.__setitem__("diffusion_model.blocks.0.ffn.0.lora_up.weight", np.zeros((64, 4), np.float32)),
            r"expected down \[r, 64\] and up \[128, r\].*got down \[4, 64\] and up \[64, 4\]",
        ),
        (
            lambda sd: sd.__setitem__("diffusion_model.blocks.0.ffn.0.lora_up.weight", np.zeros((128, 3), np.float32)),
            "rank mismatch",
        ),
        (
            lambda sd: sd.update(
                {
                    "diffusion_model.blocks.7.ffn.0.lora_down.weight": np.zeros((4, 64), np.float32),
                    "diffusion_model.blocks.7.ffn.0.lora_up.weight": np.zeros((128, 4), np.float32),
                }
            ),
            r"blocks\.7\.ffn\.0.*the model has 2 blocks",
        ),
        (
            lambda sd: sd.__setitem__("diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight", np.zeros((4, 64))),
            "Wan2.1-I2V image layers",
        ),
        (lambda sd: sd.__setitem__("diffusion_model.blocks.0.ffn.0.dora_scale", np.zeros((1, 64))), "DoRA"),
        (lambda sd: sd.__setitem__("diffusion_model.blocks.0.ffn.0.alpha", np.zeros(3, np.float32)), "scalar"),
        (
            lambda sd: sd.__setitem__("diffusion_model.blocks.0.norm3.lora_down.weight", np.zeros((4, 64))),
            "not a Linear",
        ),
        (lambda sd: sd.__setitem__("diffusion_model.patch_embedding.lora_down.weight", np.zeros((4, 64))), "Conv3d"),
    ],
)
def test_bad_lora_files_name_file_key_expected_got(tmp_path, edit, match):
    sd, _ = write_layout(random_lora(top=False), "lightning")
    edit(sd)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(L.LoraError, match=match) as e:
        L.read_lora(path, CFG)
    assert str(path) in str(e.value)


def test_unknown_keys_are_listed_or_ignored_explicitly(tmp_path):
    sd, _ = write_layout(random_lora(top=False), "lightning")
    sd["diffusion_model.blocks.0.ffn.0.something_else"] = np.zeros(3, np.float32)
    sd["text_encoder.layers.0.q.lora_down.weight"] = np.zeros((4, 8), np.float32)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(L.LoraError, match=r"2 key\(s\) name no Wan2.2 DiT LoRA tensor.*ignore_unknown=True") as e:
        L.read_lora(path, CFG)
    assert "something_else" in str(e.value) and "text_encoder" in str(e.value)
    with pytest.warns(UserWarning, match="ignored 2 unknown"):
        lw = L.read_lora(path, CFG, ignore_unknown=True)
    assert len(lw.ignored) == 2 and len(lw.modules) == 2 * len(MODS)


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"not a file")
    with pytest.raises(L.LoraError, match="not a readable safetensors"):
        L.read_lora(p, CFG)
    with pytest.raises(FileNotFoundError):
        L.read_lora(tmp_path / "missing.safetensors", CFG)


def test_lora_for_another_model_size_is_refused(f32_model):
    sd, _ = write_layout(random_lora(top=False), "lightning")
    lw = L.parse_lora(sd)  # no config: parses
    with pytest.raises(L.LoraError, match="another model size"):
        L.lora_model(nnx.eval_shape(lambda: WanDiT(CFG.replace(dim=128), rngs=nnx.Rngs(0))), [(lw, 1.0)])


# --------------------------------------------------------------------------------------------------- W4A4
def test_fold_down_undoes_smoothing_and_rotation_exactly():
    rng = np.random.default_rng(0)
    k, r = 192, 8  # K = 3 x 64: Hadamard blocks of 64
    x = rng.standard_normal((32, k)).astype(np.float32)
    a = rng.standard_normal((r, k)).astype(np.float32)
    s = np.exp(rng.standard_normal(k)).astype(np.float32)
    d = np.where(rng.random(k) < 0.5, -1.0, 1.0).astype(np.float32)
    for block in (None, 32):
        xr = rotate_activations(x / s, d, hadamard_block_size(k, block))
        got = np.asarray(xr @ L.fold_down(a.T, s, d, block))
        assert _rel(got, x @ a.T) < 5e-6  # float32 rounding only
    assert _rel(np.asarray((x / s) @ L.fold_down(a.T, s)), x @ a.T) < 5e-6


def _synth_stats(model):
    class Synth:
        def layer(self, expert, path, index):
            k = get_submodule(model, path).in_features
            rng = np.random.default_rng(hash((path, index)) % 2**31)
            rows = rng.standard_normal((1, 32, k)).astype(np.float32)
            rows[:, :, :3] *= 20.0  # outlier channels: the smoothing is far from 1
            return LayerInputs(absmax=np.abs(rows).max(1), rows=rows, hessian=None)

    return Synth()


@pytest.fixture(scope="module")
def experts():
    """A BF16 expert and its W4A4 version (smoothing + rotation + rank-8 branch + RTN on `QPATHS`; the LoRAs also
    touch two BF16 Linears of it), each used for both experts (the LoRAs differ per expert; quantizing one expert
    and three paths keeps the test fast)."""
    high = WanDiT(CFG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(10))
    q, _ = quantize({"high": high}, FAST, _synth_stats(high), progress=False, paths=QPATHS)
    return {"high": high, "low": high}, {"high": q["high"], "low": q["high"]}


def test_w4a4_lora_output_delta_is_x_times_lora(experts):
    _, q = experts
    lora = random_lora(top=False)
    lw = L.parse_lora(write_layout(lora, "lightning")[0], CFG)
    qm = q["high"]
    ql = L.lora_model(qm, [(lw, 0.7)])
    assert L.lora_ranks(ql) == {p: 4 for p in QPATHS}  # the BF16 Linears of the expert got the LoRA merged
    k0, k1 = (np.asarray(m.blocks.self_attn.o.kernel[...], np.float32) for m in (qm, ql))
    d, u, a = lora["blocks.1.self_attn.o"]
    np.testing.assert_allclose(k1[1] - k0[1], 0.7 * a / 4 * (u @ d).T, atol=2e-3)
    rng = np.random.default_rng(5)
    for path, mod in (("blocks.ffn.fc1", "ffn.0"), ("blocks.ffn.fc2", "ffn.2"), ("blocks.self_attn.q", "self_attn.q")):
        q0, q1 = qlinears(qm)[path], qlinears(ql)[path]
        assert q0.lora_down is None  # the quantized expert given is untouched
        a0 = q0.arrays()
        assert a0["smooth"] is not None and a0["rot_signs"] is not None and a0["down"] is not None
        x = jnp.asarray(rng.standard_normal((16, q0.in_features)) * 2, jnp.float32)
        for layer in range(CFG.num_layers):
            one0 = {k: (None if v is None else v[layer]) for k, v in a0.items()}
            one1 = {k: (None if v is None else v[layer]) for k, v in q1.arrays().items()}
            y0 = qlinear_apply(q0.config, one0, x, one0["act_clip"][0], dtype=jnp.float32)
            y1 = qlinear_apply(q1.config, one1, x, one1["act_clip"][0], dtype=jnp.float32)
            d, u, a = lora[f"blocks.{layer}.{mod}"]
            want = np.asarray(x) @ (0.7 * a / 4 * (u @ d)).T
            got = np.asarray(y1) - np.asarray(y0)
            rel = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert rel < 1e-2, (path, layer, rel)  # bf16 LoRA factors; the fold itself is exact (test above)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, ctx, t):
    return nnx.merge(graphdef, state)(x, t, ctx)


def _velocity(model, inputs, t=900.0):
    """The model's output (one compilation per module structure)."""
    x, ctx = inputs
    return np.asarray(_forward(*nnx.split(model), x, ctx, jnp.array([t])), np.float32)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_w4a4_plus_lora_fidelity_matches_w4a4_without(experts, inputs):
    """rel-L2 of the velocity, W4A4 + LoRA vs BF16 + LoRA, is as good as W4A4 vs BF16 without the LoRA."""
    bf, q = experts
    lw = L.parse_lora(write_layout(random_lora(top=False, scale=0.2), "lightning")[0], CFG)
    v_bf = _velocity(bf["high"], inputs)
    v_q = _velocity(q["high"], inputs)
    v_bfl = _velocity(L.lora_model(bf["high"], [(lw, 1.0)]), inputs)
    v_ql = _velocity(L.lora_model(q["high"], [(lw, 1.0)]), inputs)
    base, with_lora, effect = _rel(v_q, v_bf), _rel(v_ql, v_bfl), _rel(v_bfl, v_bf)
    print(f"rel-L2 W4A4 vs BF16: {base:.4f}; W4A4+LoRA vs BF16+LoRA: {with_lora:.4f}; LoRA effect: {effect:.4f}")
    assert effect > 3 * base  # the LoRA changes the output well beyond the quantization error
    # measured on this TINY expert (3 paths quantized, 2 inputs x 3 LoRAs): base 0.014-0.015, with LoRA
    # 0.015-0.018; a LoRA on the BF16 layers only (the branch unused) moves it alike (0.015-0.016): the quantization
    # error meets changed activations, the LoRA rank itself runs in 16 bits (exact to bf16: the test above)
    assert with_lora < 1.35 * base


def _layer_out(q, layer, x):
    a = {k: (None if v is None else v[layer]) for k, v in q.arrays().items()}
    return np.asarray(qlinear_apply(q.config, a, x, a["act_clip"][0], dtype=jnp.float32))


def test_several_loras_strengths_and_rank_padding_on_w4a4(experts):
    _, q = experts
    la, lb = random_lora(seed=1, top=False), random_lora(seed=2, rank=8, top=False)
    lw1 = L.parse_lora(write_layout(la, "lightning")[0], CFG, name="a")
    lw2 = L.parse_lora(write_layout(lb, "kohya")[0], CFG, name="b")
    both = L.lora_model(q["high"], [(lw1, 1.0), (lw2, -0.5)])
    assert L.lora_ranks(both)["blocks.ffn.fc1"] == 4 + 8
    padded = L.lora_model(q["high"], [(lw1, 1.0), (lw2, -0.5)], pad_rank="pow2")
    assert L.lora_ranks(padded)["blocks.ffn.fc1"] == 32 - 8  # own rank 8 + 12 -> 32
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 64)), jnp.float32)
    q0, q2, qp = (qlinears(m)["blocks.ffn.fc1"] for m in (q["high"], both, padded))
    for layer in range(CFG.num_layers):
        (d1, u1, a1), (d2, u2, a2) = la[f"blocks.{layer}.ffn.0"], lb[f"blocks.{layer}.ffn.0"]
        want = np.asarray(x) @ (a1 / 4 * (u1 @ d1) - 0.5 * a2 / 8 * (u2 @ d2)).T
        got = _layer_out(q2, layer, x) - _layer_out(q0, layer, x)
        assert _rel(got, want) < 1e-2, layer
        np.testing.assert_array_equal(_layer_out(qp, layer, x), _layer_out(q2, layer, x))  # zero columns: no effect
    full_delta = {"diffusion_model.blocks.0.ffn.0.diff": np.zeros((128, 64), np.float32)}
    with pytest.raises(L.LoraError, match="re-quantizing"):
        L.lora_model(q["high"], [(L.parse_lora(full_delta, CFG), 1.0)])


# --------------------------------------------------------------------------------------------------- pipeline
def _denoise(pipe):
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 20)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, CFG.text_dim)), jnp.float32)
    gen = GenerationConfig(steps=1, guide_scale=(2.0, 2.0), num_frames=5)
    noise = jnp.asarray(rng.standard_normal((1, 2, 4, 4, 16)), jnp.float32)
    return np.asarray(pipe.denoise(y, ctx, gen, noise=noise, progress=False)[0])


def _same_arrays(pipe, params):
    for e in ("high", "low"):
        leaves, ref = jax.tree.leaves(pipe.expert_params(e)), jax.tree.leaves(params[e])
        if len(leaves) != len(ref) or any(a is not b for a, b in zip(leaves, ref)):
            return False
    return True


def test_pipeline_w4a4_apply_switch_remove_is_exact(tmp_path, experts):
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.apply import attach_to_pipeline
    from wanjax.quant.bins import uniform_bins
    from wanjax.sampling import flow_schedule

    bf, q = experts
    pipe = WanI2VPipeline(bf["high"], bf["low"], vae=None)
    bins = uniform_bins(flow_schedule(2), per_expert=1)
    attach_to_pipeline(pipe, q["high"], q["low"], bins)
    out0 = _denoise(pipe)
    params0 = {e: pipe.expert_params(e) for e in ("high", "low")}
    save_file(write_layout(random_lora(top=False, scale=0.15), "lightning")[0], str(tmp_path / "high.safetensors"))
    name = L.apply_lora(pipe, tmp_path / "high.safetensors", expert="high")
    assert pipe.quant_bins is bins  # still the quantized experts' velocity
    out1 = _denoise(pipe)
    assert _rel(out1, out0) > 1e-3
    params1 = {e: pipe.expert_params(e) for e in ("high", "low")}
    # both experts carry the same branch ranks (zeros on the low expert): one module structure
    assert L.lora_ranks(nnx.merge(pipe.graphdef, params1["low"])) == {p: 4 for p in QPATHS}
    L.apply_lora(pipe, L.parse_lora(write_layout(random_lora(seed=4), "diffusers")[0], CFG, name="s"), expert="low")
    assert [a["name"] for a in L.active_loras(pipe)] == [name, "s"]
    L.set_lora_strength(pipe, "s", 0.25)
    assert [a["strength"] for a in L.active_loras(pipe)] == [1.0, 0.25]
    L.remove_lora(pipe, "s")
    np.testing.assert_array_equal(_denoise(pipe), out1)  # the other LoRA is untouched
    L.remove_lora(pipe)
    assert _same_arrays(pipe, params0)  # the quantized experts' own arrays, nothing re-quantized
    np.testing.assert_array_equal(_denoise(pipe), out0)  # exactly the outputs before any LoRA
    with pytest.raises(KeyError, match="no active LoRA"):
        L.set_lora_strength(pipe, "nope", 1.0)


def test_pipeline_bf16_merge_switch_remove_is_exact(experts):
    from wanjax.pipeline import WanI2VPipeline

    bf, _ = experts
    pipe = WanI2VPipeline(bf["high"], bf["low"], vae=None)
    params0 = {e: pipe.expert_params(e) for e in ("high", "low")}
    lora = random_lora(top=False)
    L.apply_lora(pipe, L.parse_lora(write_layout(lora, "lightning")[0], CFG, name="x"), expert="both", strength=0.5)
    d, u, a = lora["blocks.0.ffn.0"]
    for e in ("high", "low"):
        m = nnx.merge(pipe.graphdef, pipe.expert_params(e))
        k = np.asarray(m.blocks.ffn.fc1.kernel[...], np.float32)[0]
        k0 = np.asarray(nnx.merge(pipe.graphdef, params0[e]).blocks.ffn.fc1.kernel[...], np.float32)[0]
        np.testing.assert_allclose(k - k0, 0.5 * a / 4 * (u @ d).T, atol=2e-3)  # bf16 rounding of the sum
    L.set_lora_strength(pipe, "x", 0.0)
    assert not _same_arrays(pipe, params0)  # merged again (rounded once from the base: equal values)
    for e in ("high", "low"):
        for a_, b_ in zip(jax.tree.leaves(pipe.expert_params(e)), jax.tree.leaves(params0[e])):
            np.testing.assert_array_equal(np.asarray(a_), np.asarray(b_))
    L.remove_lora(pipe, "x")
    assert _same_arrays(pipe, params0) and L.active_loras(pipe) == []


def test_failed_apply_leaves_the_pipeline_as_it_was(tmp_path, experts):
    from wanjax.pipeline import WanI2VPipeline

    bf, _ = experts
    pipe = WanI2VPipeline(bf["high"], bf["low"], vae=None)
    sd, _ = write_layout(random_lora(top=False), "lightning")
    sd["diffusion_model.blocks.0.ffn.0.lora_up.weight"] = np.zeros((7, 4), np.float32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    g = pipe.graphdef
    with pytest.raises(L.LoraError, match="bad.safetensors"):
        L.apply_lora(pipe, tmp_path / "bad.safetensors", expert="high")
    assert pipe.graphdef is g and L.active_loras(pipe) == []


# --------------------------------------------------------------------------------------------------- Lightning
def test_lightning_schedule_and_preset():
    s = L.lightning_schedule(4, 5.0)
    np.testing.assert_allclose(s.sigmas, [1.0, 0.9375, 5 / 6, 0.625, 0.0], rtol=1e-6)
    assert s.timesteps.tolist() == [1000, 937, 833, 625]
    gen = GenerationConfig.lightning(GenerationConfig(num_frames=17, max_area="128x128", seed=4)).validate()
    assert (gen.steps, gen.shift, gen.solver, gen.guide_scale, gen.boundary) == (4, 5.0, "euler", (1.0, 1.0), 0.9)
    assert (gen.num_frames, gen.max_area, gen.seed) == (17, "128x128", 4)  # the base's other settings stay
    assert gen.sigma_schedule().is_high_noise(gen.boundary).tolist() == [True, True, False, False]
    assert GenerationConfig.preset("lightning", steps=6).steps == 6
    assert GenerationConfig.lightning(guidance_low=2.0).guide_scale == (2.0, 1.0)  # explicit settings win
    assert GenerationConfig().sigma_schedule().timesteps[0] == 999  # the official grid is unchanged
    with pytest.raises(ValueError, match="schedule"):
        GenerationConfig(schedule="nope").validate()
    with pytest.raises(ValueError, match="unknown generation preset"):
        GenerationConfig.preset("turbo")


def test_use_lightning_applies_both_experts_and_sets_the_preset(tmp_path, experts):
    from wanjax.pipeline import WanI2VPipeline

    bf, _ = experts
    pipe = WanI2VPipeline(bf["high"], bf["low"], vae=None)
    d = tmp_path / "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"
    d.mkdir()
    for i, e in enumerate(("high", "low")):
        save_file(write_layout(random_lora(seed=i), "lightning")[0], str(d / L.LIGHTNING_FILES[e]))
    gen = L.use_lightning(pipe, d)
    assert gen.schedule == "lightning" and pipe.generation_defaults == gen
    assert sorted((a["name"], a["expert"]) for a in L.active_loras(pipe)) == [
        ("lightning-high", "high"),
        ("lightning-low", "low"),
    ]
    kijai = tmp_path / "kijai"
    kijai.mkdir()
    for e in ("HIGH", "LOW"):
        (kijai / f"Wan2.2-Lightning_I2V-A14B-4steps-lora_{e}_fp16.safetensors").write_bytes(b"")
    assert {k: os.path.basename(v)[-20:] for k, v in L.lightning_files(kijai).items()} == {
        "high": "lora_HIGH_fp16.safetensors"[-20:],
        "low": "lora_LOW_fp16.safetensors"[-20:],
    }
    with pytest.raises(FileNotFoundError, match="cannot tell the high-noise LoRA"):
        L.lightning_files(tmp_path)


def test_qlinear_without_lora_serializes_as_before(experts):
    """The artifact sees no LoRA variable unless one is set (state keys unchanged)."""
    _, q = experts
    qm = q["high"]

    def keys(m):
        return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(m))}

    q_one = qlinears(qm)["blocks.ffn.fc1"]
    assert isinstance(q_one, QLinear) and q_one.lora_down is None and "lora_down" not in q_one.arrays()
    lw = L.parse_lora(write_layout(random_lora(top=False), "lightning")[0], CFG)
    with_lora = L.lora_model(qm, [(lw, 1.0)])
    assert any("lora_down" in k for k in keys(with_lora)) and not any("lora" in k for k in keys(qm))
    stripped = L.strip_lora(with_lora)
    assert keys(stripped) == keys(qm) and nnx.split(stripped)[0] == nnx.split(qm)[0]
