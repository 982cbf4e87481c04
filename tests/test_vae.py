"""Wan2.1 VAE: parity vs diffusers ``AutoencoderKLWan`` (CPU fp32, tiny random config), latent
normalisation, chunked/bounded execution, both checkpoint layouts, bad inputs, full-size param count."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers_diffusers import perturb_vae_norms  # noqa: E402
from wanjax.io.errors import CheckpointError  # noqa: E402
from wanjax.io.vae_loader import (
    detect_layout,
    load_vae,
    load_vae_state_dict,
    vae_config_from_dict,
    vae_key_table,
)
from wanjax.model.vae import (
    LATENTS_MEAN,
    LATENTS_STD,
    VAEConfig,
    abstract_vae,
    decode_video,
    encode_video,
    init_vae,
)

TOL = 1e-5
# tiny: 3 levels (spatial stride 4), one temporal down/up-sample, odd latent sizes (12x20 -> 3x5)
TINY = VAEConfig(
    base_dim=8,
    z_dim=4,
    dim_mult=(1, 2, 2),
    num_res_blocks=1,
    temporal_downsample=(False, True),
    latents_mean=(0.3, -0.7, 1.1, 0.05),
    latents_std=(1.7, 0.6, 2.4, 1.1),
)
H, W = 12, 20


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _to_cl(t) -> jnp.ndarray:  # torch [B, C, F, H, W] -> jax [B, F, H, W, C]
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 4, 1))


def _to_cf(a) -> np.ndarray:  # jax [B, F, H, W, C] -> numpy [B, C, F, H, W]
    return np.asarray(a).transpose(0, 4, 1, 2, 3)


def _torch_vae(cfg: VAEConfig, seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKLWan(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temporal_downsample),
        latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    ).eval()
    return perturb_vae_norms(ref)  # make norms and biases non-trivial


@pytest.fixture(scope="module")
def pair():
    ref = _torch_vae(TINY)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    vae = load_vae_state_dict(abstract_vae(TINY), sd)
    return ref, vae, sd


@pytest.mark.parametrize("frames,batch", [(1, 1), (5, 2), (9, 1)])
def test_encode_parity(pair, frames, batch):
    ref, vae, _ = pair
    g = torch.Generator().manual_seed(frames)
    x = torch.rand(batch, 3, frames, H, W, generator=g) * 2 - 1
    with torch.no_grad():
        mu_ref = ref.encode(x).latent_dist.mode()
    mu = vae.encode_raw(_to_cl(x))
    assert mu.shape == (batch, 1 + (frames - 1) // 2, H // 4, W // 4, TINY.z_dim)
    assert _to_cf(mu).shape == tuple(mu_ref.shape)
    assert _rel(_to_cf(mu), mu_ref.numpy()) <= TOL


@pytest.mark.parametrize("lat_frames,batch", [(1, 1), (3, 2), (5, 1)])
def test_decode_parity(pair, lat_frames, batch):
    ref, vae, _ = pair
    g = torch.Generator().manual_seed(100 + lat_frames)
    z = 0.5 * torch.randn(batch, TINY.z_dim, lat_frames, H // 4, W // 4, generator=g)
    with torch.no_grad():
        out_ref = ref.decode(z).sample.numpy()
    out = _to_cf(vae.decode_raw(_to_cl(z)))
    assert out.shape == out_ref.shape == (batch, 3, 1 + 2 * (lat_frames - 1), H, W)
    assert np.mean(np.abs(out_ref) >= 1.0) < 0.25, "reference output mostly clamped: test would be weak"
    assert _rel(out, out_ref) <= TOL
    assert out.min() >= -1.0 and out.max() <= 1.0


# the real topology (4 levels, 2 residual blocks, temporal down-sampling on levels 2 and 3, published
# mean/std) at tiny widths: exercises both temporal up-samplers, incl. the 2-frame first-time path
SMALL_REAL = VAEConfig(base_dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2)


def test_parity_real_topology():
    """Jitted public API (normalised latents, published mean/std) vs diffusers + (x - mean) * (1 / std)."""
    ref = _torch_vae(SMALL_REAL, seed=1)
    vae = load_vae_state_dict(abstract_vae(SMALL_REAL), ref.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 9, 16, 24, generator=g) * 2 - 1
    mean = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        lat_ref = (ref.encode(x).latent_dist.mode() - mean) * (1.0 / std)
        out_ref = ref.decode(lat_ref / (1.0 / std) + mean).sample.numpy()
    lat = encode_video(vae, _to_cl(x))
    assert lat.shape == (1, 3, 2, 3, 16)
    assert _rel(_to_cf(lat), lat_ref.numpy()) <= TOL
    out = _to_cf(decode_video(vae, lat))
    assert out.shape == out_ref.shape == (1, 3, 9, 16, 24)
    assert np.mean(np.abs(out_ref) >= 1.0) < 0.25
    assert _rel(out, out_ref) <= TOL


def test_init_vae():
    vae = init_vae(TINY, seed=3)
    shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(abstract_vae(TINY), nnx.Param))}
    got = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
    assert {p: a.shape for p, a in got.items()} == shapes
    for p, a in got.items():
        if p[-1] == "gamma":
            assert np.all(a == 1), p
        elif str(p[-1]).endswith("kernel"):
            bound = 1 / np.sqrt(np.prod(a.shape[:-1]))
            assert np.abs(a).max() <= bound and a.std() > 0.4 * bound, p
        else:
            assert np.all(a == 0), p
    k1 = np.asarray(vae.encoder.conv_in.kernel[...])
    assert not np.array_equal(k1, np.asarray(init_vae(TINY, seed=4).encoder.conv_in.kernel[...]))


def test_normalization(pair):
    _, vae, _ = pair
    # published constants = diffusers' AutoencoderKLWan defaults (independent copy)
    with torch.device("meta"):
        dflt = diffusers.AutoencoderKLWan().config
    np.testing.assert_array_equal(np.float32(LATENTS_MEAN), np.float32(dflt.latents_mean))
    np.testing.assert_array_equal(np.float32(LATENTS_STD), np.float32(dflt.latents_std))
    assert VAEConfig().latents_mean == LATENTS_MEAN and VAEConfig().latents_std == LATENTS_STD
    assert LATENTS_MEAN[0] == -0.7571 and LATENTS_STD[-1] == 1.9160

    mean, std = np.float32(TINY.latents_mean), np.float32(TINY.latents_std)
    mu = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 3, 5, TINY.z_dim))) * 3
    np.testing.assert_allclose(np.asarray(vae.normalize(mu)), (mu - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vae.denormalize(mu)), mu * std + mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vae.denormalize(vae.normalize(mu))), mu, rtol=1e-5, atol=1e-5)
    x = jax.random.uniform(jax.random.key(0), (1, 1, H, W, 3), minval=-1, maxval=1)
    np.testing.assert_array_equal(np.asarray(vae.encode(x)), np.asarray(vae.normalize(vae.encode_raw(x))))
    lat = mu[:1, :1]
    np.testing.assert_array_equal(np.asarray(vae.decode(lat)), np.asarray(vae.decode_raw(vae.denormalize(lat))))


def test_bf16_compute(pair):
    """bf16 weights + compute through the jitted public API (normalised latents): the chunked path keeps
    its cache dtypes consistent, outputs come back fp32 and stay close to the fp32 torch reference."""
    ref, _, sd = pair
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 5, H, W, generator=g) * 2 - 1
    mean = torch.tensor(TINY.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(TINY.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        lat_ref = (ref.encode(x).latent_dist.mode() - mean) * inv_std
        out_ref = ref.decode(lat_ref / inv_std + mean).sample.numpy()
    v16 = load_vae_state_dict(abstract_vae(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), sd)
    assert all(v.get_value().dtype == jnp.bfloat16 for _, v in nnx.to_flat_state(nnx.state(v16, nnx.Param)))
    lat16 = encode_video(v16, _to_cl(x))
    assert lat16.dtype == jnp.float32 and lat16.shape == (1, 3, H // 4, W // 4, TINY.z_dim)
    assert 1e-4 < _rel(_to_cf(lat16), lat_ref.numpy()) < 5e-2  # bf16 really used, and close
    out16 = decode_video(v16, jnp.asarray(lat_ref.numpy().transpose(0, 2, 3, 4, 1)))
    assert out16.dtype == jnp.float32 and out16.shape == (1, 5, H, W, 3)
    assert 1e-4 < _rel(_to_cf(out16), out_ref) < 1e-1


def _conv_frame_counts(jaxpr) -> list[int]:
    """Input frame counts of every non-pointwise 3-D conv in ``jaxpr`` (scan bodies included)."""
    counts = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated" and eqn.invars[0].aval.ndim == 5:
            if tuple(eqn.invars[1].aval.shape[:3]) != (1, 1, 1):
                counts.append(eqn.invars[0].aval.shape[1])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            counts += _conv_frame_counts(sub)
    return counts


def test_chunked_execution_is_bounded(pair):
    """No 3x3x3 / temporal conv ever sees more than one chunk plus 2 cached frames, whatever the length."""
    _, vae, _ = pair
    x = jnp.zeros((1, 17, H, W, 3))
    enc = jax.make_jaxpr(lambda v: vae.encode_raw(v))(x).jaxpr
    assert any(e.primitive.name == "scan" for e in enc.eqns)
    counts = _conv_frame_counts(enc)
    assert len(counts) > 10 and max(counts) == 4 + 2  # conv_in on a 4-frame chunk + 2 cached frames
    z = jnp.zeros((1, 7, H // 4, W // 4, TINY.z_dim))
    dec = jax.make_jaxpr(lambda v: vae.decode_raw(v))(z).jaxpr
    assert any(e.primitive.name == "scan" for e in dec.eqns)
    counts = _conv_frame_counts(dec)
    assert len(counts) > 10 and max(counts) == 2 + 2  # one latent frame -> at most 2 frames (+2 cached)


def _params(vae) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def test_layouts_load_identical(pair, tmp_path):
    ref, vae, sd = pair
    table = vae_key_table(TINY)
    assert len(table) == len(sd) and {e.diffusers for e in table} == set(sd)
    official = {e.official: sd[e.diffusers] for e in table}
    assert "encoder.conv1.weight" in official and "decoder.upsamples.2.time_conv.weight" in official
    assert detect_layout(official) == "official" and detect_layout(sd) == "diffusers"
    want = _params(vae)
    # official .pth (torch.save zip format, read back with weights_only=True)
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: torch.from_numpy(v) for k, v in official.items()}, pth)
    got = _params(load_vae(pth, TINY))
    # diffusers folder written by diffusers itself
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    got2 = _params(load_vae(tmp_path / "vae"))
    assert want.keys() == got.keys() == got2.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
        np.testing.assert_array_equal(got2[k], want[k], err_msg=str(k))
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert vae_config_from_dict(cfg) == TINY


def test_key_map_matches_diffusers_converter():
    """Full-size official keys -> diffusers' own single-file converter -> our diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    table = vae_key_table(VAEConfig())
    official = {e.official: e.diffusers for e in table}
    converted = convert_wan_vae_to_diffusers(official)
    assert len(converted) == len(table)
    for new_key, ours in converted.items():
        assert new_key == ours
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes == {e.diffusers: e.torch_shape for e in table}


class _NotATensor:  # pickled as an arbitrary object: weights_only loading must refuse it
    pass


def test_pth_without_torch(monkeypatch, tmp_path):
    """The official .pth is read without torch (wanjax.io.pth): with torch blocked, a missing file is still a clear
    FileNotFoundError, not an ImportError."""
    import sys

    from wanjax.io.vae_loader import read_official_pth

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(FileNotFoundError, match="VAE checkpoint not found"):
        read_official_pth(tmp_path / "Wan2.1_VAE.pth")


def test_bad_inputs(pair, tmp_path):
    _, vae, sd = pair
    fresh = abstract_vae(TINY)
    bad = dict(sd)
    del bad["decoder.up_blocks.0.upsamplers.0.time_conv.weight"]
    with pytest.raises(ValueError, match=r"decoder\.up_blocks\.0\.upsamplers\.0\.time_conv\.weight.*expected shape"):
        load_vae_state_dict(fresh, bad)
    bad = dict(sd)
    bad["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3, 2), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'encoder\.conv_in\.weight' has shape \(8, 3, 3, 3, 2\), "
        r"expected \(8, 3, 3, 3, 3\)",
    ):
        load_vae_state_dict(fresh, bad)
    bad = dict(sd, **{"encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unexpected.*encoder.extra.weight"):
        load_vae_state_dict(fresh, bad)
    with pytest.raises(ValueError, match="not a Wan VAE state dict"):
        load_vae_state_dict(fresh, {"foo.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="4n\\+1.*got 6"):
        vae.encode(jnp.zeros((1, 6, H, W, 3)))
    with pytest.raises(ValueError, match="multiples of 4, got 10x20"):
        vae.encode(jnp.zeros((1, 5, 10, W, 3)))
    with pytest.raises(ValueError, match=r"channels-last.*\(1, 3, 5, 12, 20\)"):
        vae.encode(jnp.zeros((1, 3, 5, H, W)))
    with pytest.raises(ValueError, match=r"latents \[B, F_lat>=1, h, w, 4\].*\(1, 2, 3, 5, 16\)"):
        vae.decode(jnp.zeros((1, 2, 3, 5, 16)))
    with pytest.raises(FileNotFoundError, match="missing"):
        (tmp_path / "vae").mkdir()
        load_vae(tmp_path / "vae")
    pickled = tmp_path / "pickle.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(1), "extra": _NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match=r"pickle\.pth: data\.pkl refers to the global .*_NotATensor.*refusing"):
        load_vae(pickled, TINY)
    with pytest.raises(FileNotFoundError, match="no such VAE file or folder"):
        load_vae(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="Wan2.2 .*VAE"):
        vae_config_from_dict({"_class_name": "AutoencoderKLWan", "is_residual": True, "patch_size": 2})
    with pytest.raises(ValueError, match=r"temporal_downsample needs len\(dim_mult\) - 1 = 2 entries, got 3"):
        VAEConfig(dim_mult=(1, 2, 2), temporal_downsample=(False, True, True))


def test_full_size_param_count():
    """126,892,531 = encoder 53,595,872 + decoder 73,295,331 + quant_conv 32*32+32 + post_quant_conv 16*16+16."""
    vae = abstract_vae(VAEConfig())
    sizes = {p: int(np.prod(v.get_value().shape)) for p, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}
    total = sum(sizes.values())
    enc = sum(n for p, n in sizes.items() if p[0] == "encoder")
    dec = sum(n for p, n in sizes.items() if p[0] == "decoder")
    assert (enc, dec) == (53_595_872, 73_295_331)
    assert total == 53_595_872 + 73_295_331 + (32 * 32 + 32) + (16 * 16 + 16) == 126_892_531
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()
    assert total == sum(p.numel() for p in ref.parameters())
