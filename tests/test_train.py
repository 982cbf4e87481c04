"""Mini-model training tools: tokenizer, official-layout writers, latent fold, flow-matching step, end-to-end smoke."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import WanConfig
from wanjax.io.t5_loader import load_t5_encoder
from wanjax.io.vae_loader import load_vae, read_official_pth
from wanjax.model.t5 import small_t5_config
from wanjax.model.vae import VAEConfig, init_vae
from wanjax.train import dit as D
from wanjax.train import text as T
from wanjax.train import vae as V
from wanjax.pipeline import WanI2VPipeline
from wanjax.train.export_components import save_t5_pth, save_vae_pth, vae_config_from_official_state

TINY_VAE = VAEConfig(base_dim=4, z_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
TINY_T5 = small_t5_config(vocab_size=64, dim=32, dim_ffn=48, num_heads=2, num_layers=2)
TINY_DIT = WanConfig(dim=32, ffn_dim=64, num_heads=1, num_layers=1, text_dim=32, text_len=16, freq_dim=32)


def _flat(model):
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_tokenizer_ids_eos_unk(tmp_path):
    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT
    from wanjax.text import PromptTokenizer

    T.save_tokenizer(tmp_path / "google" / "umt5-xxl")
    tok = PromptTokenizer(tmp_path, text_len=16)
    r = tok(["a red square moves left", "A red square moves left.", "a red zebra", DEFAULT_NEGATIVE_PROMPT])
    assert r.lengths.tolist()[:2] == [6, 6]
    np.testing.assert_array_equal(r.ids[0], r.ids[1])
    assert r.ids[0, 5] == 1 and r.ids[0, 6] == 0  # </s> then <pad>
    assert r.ids[2, 2] == 2  # <unk>
    assert r.lengths[3] <= 3 and not r.truncated.any()  # the Chinese negative prompt stays short
    assert len(set(r.ids[0, :5].tolist())) == 5


def test_t5_pth_roundtrip(tmp_path):
    enc = T.mini_t5(TINY_T5, seed=3)
    p = save_t5_pth(enc, tmp_path / "t5.pth", dtype="float32")
    back = load_t5_encoder(p, dtype=jnp.float32, param_dtype=jnp.float32)
    assert back.cfg.num_layers == 2 and back.cfg.dim == 32 and back.cfg.vocab_size == 64
    a, b = _flat(enc), _flat(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("cfg", [TINY_VAE, V.MINI_VAE])
def test_vae_pth_roundtrip_and_config_inference(tmp_path, cfg):
    vae = init_vae(cfg, seed=1)
    p = save_vae_pth(vae, tmp_path / "Wan2.1_VAE.pth", dtype="float32")
    sd = read_official_pth(p)
    assert "encoder.conv1.weight" in sd and "decoder.head.2.weight" in sd
    inferred = vae_config_from_official_state(sd)
    assert inferred == cfg
    back = load_vae(p, inferred)
    a, b = _flat(vae), _flat(back)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_vae_config_inference_rejects_non_vae():
    with pytest.raises(KeyError, match="encoder.conv1.weight"):
        vae_config_from_official_state({"foo": np.zeros(3)})


def test_fold_latent_stats_is_exact_affine_change():
    vae = init_vae(TINY_VAE, seed=2)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 1, 16, 16, 3)), jnp.float32)
    mu_old = vae.encode_raw(x)
    rec_old = vae.decode_raw(mu_old)
    m = np.asarray(mu_old.mean((0, 1, 2, 3)))
    s = np.asarray(mu_old.std((0, 1, 2, 3))) + 0.1
    V.fold_latent_stats(vae, m, s)
    lat = vae.encode(x)  # normalised with the fixed Wan2.1 constants
    np.testing.assert_allclose(np.asarray(lat), (np.asarray(mu_old) - m) / s, atol=2e-4)
    np.testing.assert_allclose(np.asarray(vae.decode(lat)), np.asarray(rec_old), atol=2e-4)


def test_expert_ranges_follow_the_boundary():
    lo, hi = D.expert_u_range("high")
    assert abs(float(D.shift_sigma(lo, 5.0)) - 0.9) < 1e-9 and hi == 1.0
    assert D.expert_u_range("low") == (0.0, lo) and D.expert_u_range("base") == (0.0, 1.0)
    assert D.lr_at(0, 1.0, 0.0, warmup=10) == pytest.approx(0.1)
    assert D.lr_at(50, 1.0, 1.0, warmup=10) == pytest.approx(0.1)
    assert D.lr_at(50, 1.0, 0.0, warmup=10) == pytest.approx(1.0)


def test_flow_matching_step_reduces_loss():
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((4, 2, 4, 4, 16)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 2, 4, 4, 20)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((4, 5, 32)), jnp.float32)
    neg = jnp.zeros((1, 5, 32), jnp.float32)
    tr = D.Trainer(D.new_dit(TINY_DIT, seed=0, dtype=jnp.float32), drop_text=0.0)
    u = D.expert_u_range("base")

    def ev():
        return np.mean([float(tr.eval_loss(tr.params, x0, y, ctx, jax.random.key(k), *u)) for k in range(4)])

    before = ev()
    for i in range(30):
        loss = tr.step(x0, y, ctx, neg, jax.random.key(100 + i), 3e-3, u)
        assert np.isfinite(float(loss))
    after = ev()
    assert after < 0.8 * before, (before, after)


def test_train_export_load_generate_smoke(tmp_path):
    """run (tiny: DiT 3 steps) -> flat files -> official layout -> loaders -> pipeline generation."""
    from wanjax.train import cli

    out, aux, dst = tmp_path / "run", tmp_path / "aux", tmp_path / "official"
    cli.main(
        [
            "run",
            "--out",
            str(out),
            "--aux",
            str(aux),
            "--preset",
            "tiny",
            "--vae-steps",
            "0",
            "--vae-pool",
            "4",
            "--stats-clips",
            "2",
            "--n-train",
            "4",
            "--enc-batch",
            "2",
            "--batch",
            "2",
            "--base-steps",
            "3",
            "--expert-steps",
            "1",
            "--eval-n",
            "0",
            "--log-every",
            "1",
        ]
    )
    files = sorted(os.listdir(out))
    assert files == sorted(
        ["high.safetensors", "low.safetensors", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "log.json"]
    )
    cli.assemble(str(out), str(dst), aux=str(aux), preset="tiny")
    for p in (
        "high_noise_model/config.json",
        "low_noise_model/diffusion_pytorch_model.safetensors.index.json",
        "Wan2.1_VAE.pth",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "google/umt5-xxl/tokenizer.json",
    ):
        assert (dst / p).exists(), p
    pipe = WanI2VPipeline.from_pretrained(str(dst), dtype=jnp.float32)
    assert pipe.cfg.text_len == 16 and pipe.vae.cfg == TINY_VAE.replace(
        latents_mean=pipe.vae.cfg.latents_mean, latents_std=pipe.vae.cfg.latents_std
    )
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    o = pipe.generate(img, "a red square moves left", num_frames=5, max_area=32 * 32, steps=2, progress=False)
    assert o.frames.shape == (5, 32, 32, 3) and o.frames.dtype == np.uint8
    assert o.experts == ["high", "low"]


def test_vae_loss_chroma_term_and_ratio():
    """The chroma term adds ``chroma_weight * chroma_l1`` to the loss; ``chroma_ratio`` is 0 for grey output."""
    grey = jnp.broadcast_to(jnp.linspace(-1, 1, 16)[None, None, :, None, None], (1, 5, 16, 16, 3))
    np.testing.assert_allclose(np.asarray(V.chroma(grey)), 0.0, atol=1e-7)
    col = grey * jnp.array([1.0, -0.5, 0.2])
    assert float(jnp.abs(V.chroma(col)).max()) > 0.1
    vae = init_vae(TINY_VAE, seed=4)
    key = jax.random.key(0)
    l0, m0 = V.vae_loss(vae, col, key, chroma_weight=0.0)
    l1, m1 = V.vae_loss(vae, col, key, chroma_weight=1.5)
    np.testing.assert_allclose(float(l1), float(l0) + 1.5 * float(m1["chroma_l1"]), rtol=1e-5)
    assert np.isfinite(float(m0["chroma_ratio"])) and float(m0["chroma_ratio"]) > 0
    # a decoder that outputs grey has ratio 0: measured on the chroma of a grey reconstruction
    assert float(jnp.std(V.chroma(grey)) / jnp.std(V.chroma(col))) < 1e-6


def test_vae_check_measures_colour_and_tracking():
    """`vae_check` on a random tiny VAE: the tracker sees every planted direction on the inputs (the ceiling) and
    the metrics are those of the round trip (a random VAE is far from the inputs)."""
    from wanjax.train.evaluate import vae_check

    vae = init_vae(TINY_VAE, seed=0)
    res = vae_check(vae, n=2, seed=1000, batch=2)
    assert res["tracker_on_truth"] == 1.0
    assert res["n"] == 2 and len(res["tracked"]) == 2
    assert res["psnr"] < 20.0 and res["chroma_ratio"] >= 0.0
    assert res["example"].shape[0] == 2 and res["example"].dtype == np.uint8


def test_patch_colour_and_latent_colour_term():
    """`patch_colour` averages frame 0 alone and then groups of 4 frames, over each latent pixel's patch; the colour
    term adds ``colour_weight * latent_colour_l1`` to the loss."""
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.uniform(-1, 1, (2, 9, 16, 24, 3)), jnp.float32)
    pc = np.asarray(V.patch_colour(video, (2, 3, 2, 3, 16)))
    v = np.asarray(video)
    assert pc.shape == (2, 3, 2, 3, 3)
    np.testing.assert_allclose(pc[1, 0, 1, 2], v[1, 0, 8:16, 16:24].mean((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(pc[0, 2, 0, 1], v[0, 5:9, 0:8, 8:16].mean((0, 1, 2)), rtol=1e-5)
    vae = init_vae(TINY_VAE, seed=4)
    key = jax.random.key(0)
    l0, m0 = V.vae_loss(vae, video, key)
    l1, m1 = V.vae_loss(vae, video, key, colour_weight=2.0)
    np.testing.assert_allclose(float(l1), float(l0) + 2.0 * float(m1["latent_colour_l1"]), rtol=1e-5)
    assert float(m1["latent_colour_l1"]) > 0


def test_zero_residual_init_starts_from_the_shortcuts():
    """`zero_residual_init` zeroes exactly the last layer of each residual / attention branch: every block is then its
    shortcut, every other parameter equals the default init of the same seed, and the zeroed layers get gradients."""
    from wanjax.model.vae_layers import AttentionBlock, ResidualBlock

    cfg = VAEConfig(base_dim=4, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    ref = _flat(V.new_vae(cfg, seed=3))
    vae = V.new_vae(cfg, seed=3, zero_residual=True)
    got = _flat(vae)
    zeroed = {k for k in got if not np.array_equal(got[k], ref[k])}
    assert zeroed and all(k.endswith(("conv2/kernel", "proj_kernel")) for k in zeroed), sorted(zeroed)
    assert all(
        not np.any(got[k]) for k in got if k.endswith(("conv2/kernel", "conv2/bias", "proj_kernel", "proj_bias"))
    )
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 1, 8, 8, 8)), jnp.float32)
    blocks = [m for _, m in nnx.iter_graph(vae) if isinstance(m, (ResidualBlock, AttentionBlock))]
    assert any(isinstance(b, AttentionBlock) for b in blocks)
    for b in blocks:
        xin = x[..., : (b.norm1 if isinstance(b, ResidualBlock) else b.norm).gamma.shape[0]]
        short = xin if not isinstance(b, ResidualBlock) or b.conv_shortcut is None else b.conv_shortcut(xin)[0]
        np.testing.assert_allclose(np.asarray(b(xin)[0]), np.asarray(short), rtol=1e-6, atol=1e-6)
    video = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 1, 16, 16, 3)), jnp.float32)
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    grads = jax.grad(lambda p: V.vae_loss(nnx.merge(graphdef, p, rest), video, jax.random.key(0))[0])(params)
    g = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(grads)}
    assert all(np.any(g[k]) for k in zeroed), [k for k in zeroed if not np.any(g[k])]


def test_branch_freeze_holds_the_zeroed_layers_and_colour_on_sample():
    """``Trainer.step(train_branches=False)`` leaves the branch-final layers at zero (the model stays the plain conv
    chain) while everything else trains; releasing them moves them. The colour term on the sampled latent differs
    from the one on its mean by the sampling noise; a bad ``colour_on`` is refused."""
    cfg = VAEConfig(base_dim=4, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
    tr = V.Trainer(V.new_vae(cfg, seed=0, zero_residual=True), colour_weight=1.0)
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 1, 16, 16, 3)), jnp.float32)
    start = _flat(tr.model())
    for i in range(2):
        tr.step(video, jax.random.key(i), 1e-3, train_branches=False)
    frozen = _flat(tr.model())
    mask = {
        "/".join(str(k.key) for k in p if hasattr(k, "key")): b
        for p, b in jax.tree_util.tree_leaves_with_path(V.branch_mask(tr.params))
    }
    assert sum(mask.values()) > 0
    for k, v in frozen.items():
        if mask[k]:
            assert not np.any(v), k
    assert any(not np.array_equal(frozen[k], start[k]) for k in frozen if not mask[k])
    tr.step(video, jax.random.key(5), 1e-3, train_branches=True)
    released = _flat(tr.model())
    assert any(np.any(released[k]) for k in released if mask[k] and k.endswith("kernel"))
    vae = tr.model()
    key = jax.random.key(3)
    _, ms = V.vae_loss(vae, video, key, colour_weight=1.0)
    _, mm = V.vae_loss(vae, video, key, colour_weight=1.0, colour_on="mean")
    assert float(ms["latent_colour_l1"]) != float(mm["latent_colour_l1"])
    assert 0.5 < float(ms["colour_sigma"]) < 2.0
    with pytest.raises(ValueError, match="colour_on must be"):
        V.vae_loss(vae, video, key, colour_on="z")
