"""The pipeline's Python API: Hub repo ids, per-model defaults (generation_config.json, the diffusers layout's
boundary_ratio / flow_shift), diffusers-named arguments, output types, ambiguous model directories."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.generation_config import GenerationConfig, apply_overrides
from wanjax.model.dit import WanDiT
from wanjax.pipeline import WanI2VPipeline, _format_frames, model_layout, resolve_model_dir

huggingface_hub = pytest.importorskip("huggingface_hub")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "models", "mini")


def _link_copy(src, dst):
    """A copy of a model dir made of symlinks (cheap)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
    return str(dst)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def hub_pipe(tmp_path_factory):
    """models/mini 'downloaded' through a monkeypatched snapshot_download."""
    if not os.path.isdir(os.path.join(MINI, "high_noise_model")):
        pytest.skip("models/mini is not shipped in this checkout")
    snap = _link_copy(MINI, tmp_path_factory.mktemp("hub") / "snapshot")
    calls = []
    mp = pytest.MonkeyPatch()
    mp.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo_id, revision=None, cache_dir=None: calls.append((repo_id, revision)) or snap,
    )
    try:
        pipe = WanI2VPipeline.from_pretrained("acme/wan-mini", revision="v1", dtype=jnp.float32)
    finally:
        mp.undo()
    assert calls == [("acme/wan-mini", "v1")]
    return pipe, snap


def test_repo_id_downloads_and_records_the_model_dir(hub_pipe):
    pipe, snap = hub_pipe
    assert pipe.model_dir == snap
    d = pipe.generation_defaults  # the mini model's generation_config.json
    assert (d.num_frames, d.max_area, d.steps) == (17, "128x128", 20)


def test_generate_without_settings_uses_the_model_defaults(hub_pipe, monkeypatch):
    pipe, _ = hub_pipe
    seen = []

    def stop(y, ctx, gen, **kw):
        seen.append(gen)
        raise _Stop

    monkeypatch.setattr(pipe, "encode_text", lambda prompts: jnp.zeros((2, 4, pipe.cfg.text_dim)))
    monkeypatch.setattr(pipe, "prepare_condition", lambda image, f, area: (jnp.zeros((1, 5, 16, 16, 20)), (128, 128)))
    monkeypatch.setattr(pipe, "denoise", stop)
    img = np.zeros((100, 100, 3), np.uint8)
    with pytest.raises(_Stop):
        pipe.generate(img, "a prompt", progress=False)
    assert seen[-1] == pipe.generation_defaults
    with pytest.raises(_Stop):  # diffusers names, mapped onto the model's defaults
        pipe(
            img,
            "a prompt",
            progress=False,
            num_inference_steps=4,
            height=64,
            width=96,
            guidance_scale=5.0,
            guidance_scale_2=2.0,
            num_frames=9,
        )
    g = seen[-1]
    assert (g.steps, g.max_area, g.num_frames, g.guidance_high, g.guidance_low) == (4, 64 * 96, 9, 5.0, 2.0)
    assert (g.shift, g.fps) == (pipe.generation_defaults.shift, 16)


def test_hub_failures_name_the_id_and_the_cause(monkeypatch, tmp_path):
    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError) as e:
        WanI2VPipeline.from_pretrained("acme/not-here")
    msg = str(e.value)
    assert "'acme/not-here'" in msg and "not a local directory" in msg and "couldn't connect" in msg
    # not an id, not a dir: no download attempted, the layouts are named
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    for bad in ("/nonexistent/model", "./a/b", str(tmp_path / "x")):
        with pytest.raises(FileNotFoundError, match="official layout"):
            resolve_model_dir(bad)
    # an existing local dir that looks like an id is used as is
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model_dir("org/name") == "org/name"
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model_dir("f.bin")


def test_a_dir_with_both_layouts_is_refused(tmp_path):
    for d in ("high_noise_model", "low_noise_model", "transformer", "transformer_2"):
        (tmp_path / d).mkdir()
    with pytest.raises(ValueError) as e:
        WanI2VPipeline.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "two model layouts" in msg and "high_noise_model/" in msg and "transformer/" in msg
    (tmp_path / "transformer").rmdir()
    (tmp_path / "transformer_2").rmdir()
    assert model_layout(str(tmp_path)) == "official"


def test_diffusers_layout_defaults_and_their_precedence(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.875})
    )
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"flow_shift": 3.0}))
    g = GenerationConfig.for_model(tmp_path)
    assert (g.boundary, g.shift, g.steps) == (0.875, 3.0, 40)
    (tmp_path / "generation_config.json").write_text(json.dumps({"shift": 8.0, "steps": 12}))
    g = GenerationConfig.for_model(tmp_path, steps=6)  # explicit > generation_config.json > diffusers files
    assert (g.boundary, g.shift, g.steps) == (0.875, 8.0, 6)
    (tmp_path / "model_index.json").write_text(json.dumps({"boundary_ratio": 1.5}))
    with pytest.raises(ValueError, match=r"model_index.json.*boundary_ratio.*\[0, 1\]"):
        GenerationConfig.for_model(tmp_path)


def test_guidance_names_never_swap():
    base = GenerationConfig(guide_scale=(1.0, 2.0))  # (low-noise, high-noise)
    assert apply_overrides(base, {"guidance_low": 7.0}).guide_scale == (7.0, 2.0)
    assert apply_overrides(base, {"guidance_high": 7.0}).guide_scale == (1.0, 7.0)
    assert apply_overrides(base, {"guide_scale": (3.0, 4.0)}).guide_scale == (3.0, 4.0)
    # diffusers: guidance_scale -> transformer (high noise), guidance_scale_2 -> transformer_2 (low noise),
    # guidance_scale_2 defaulting to guidance_scale
    assert apply_overrides(base, {"guidance_scale": 5.0}).guide_scale == (5.0, 5.0)
    g = apply_overrides(base, {"guidance_scale": 5.0, "guidance_scale_2": 2.5})
    assert (g.guidance_low, g.guidance_high) == (2.5, 5.0)
    assert GenerationConfig.create(guidance_low=1.5, guidance_high=6.0).guide_scale == (1.5, 6.0)
    for clash in (
        {"guidance_high": 1.0, "guidance_scale": 2.0},
        {"guidance_low": 1.0, "guidance_scale_2": 2.0},
        {"guide_scale": (1.0, 2.0), "guidance_low": 3.0},
        {"steps": 3, "num_inference_steps": 4},
        {"max_area": 4096, "height": 64, "width": 64},
        {"height": 64},
    ):
        with pytest.raises(TypeError):
            apply_overrides(base, clash)


@pytest.fixture(scope="module")
def tiny():
    return WanDiT(TINY.replace(num_layers=1), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_generate_argument_errors_list_the_valid_names(tiny):
    pipe = WanI2VPipeline(tiny, tiny, vae=None)
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(TypeError) as e:
        pipe.generate(img, "p", num_inference_step=3)  # a typo
    msg = str(e.value)
    for name in (
        "num_inference_steps",
        "steps",
        "guidance_low",
        "guidance_scale_2",
        "height",
        "output_type",
        "negative_prompt",
        "num_frames",
        "seed",
    ):
        assert name in msg
    with pytest.raises(TypeError, match="seed="):
        pipe.generate(img, "p", generator=object())
    with pytest.raises(ValueError, match="output_type"):
        pipe.generate(img, "p", output_type="pt")
    with pytest.raises(ValueError, match="num_frames.*4n\\+1.*steps"):
        pipe.generate(img, "p", num_frames=6, steps=0)


def test_latent_output_skips_the_decode_and_stage_lines(capsys, tiny):
    pipe = WanI2VPipeline(tiny, tiny, vae=None)
    y = jnp.concatenate([jnp.ones((1, 2, 2, 2, 4)), jnp.zeros((1, 2, 2, 2, 16))], -1)
    pipe.prepare_condition = lambda image, f, area: (y, (16, 16))
    pipe.decode = lambda lat: pytest.fail("decoded a latent output")
    ctx = jnp.zeros((2, 3, TINY.text_dim))
    out = pipe.generate(
        np.zeros((16, 16, 3), np.uint8), context=ctx, num_frames=5, max_area=256, steps=2, output_type="latent"
    )
    assert out.frames is None and out.latents.shape == (1, 2, 2, 2, 16) and out.gen.steps == 2
    err = capsys.readouterr().err
    assert "wanjax: VAE encode (5 frames)" in err and "denoise" in err and "VAE decode" not in err
    lat = pipe(
        np.zeros((16, 16, 3), np.uint8),
        context=ctx,
        num_frames=5,
        max_area=256,
        steps=2,
        output_type="latent",
        progress=False,
    )
    np.testing.assert_array_equal(lat, out.latents)
    assert capsys.readouterr().err == ""  # progress=False: silent


def test_output_types():
    video = np.linspace(-1, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    u8 = _format_frames(video, None)
    assert u8.dtype == np.uint8 and u8[0, 0, 0, 0] == 0 and u8[-1, -1, -1, -1] == 255
    f = _format_frames(video, "np")
    assert f.dtype == np.float32 and f.min() == 0.0 and f.max() == 1.0  # diffusers' "np": [0, 1]
    pil = _format_frames(video, "pil")
    assert len(pil) == 2 and pil[0].size == (4, 4) and np.array_equal(np.asarray(pil[1]), u8[1])
