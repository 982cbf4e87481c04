"""Whole-pipeline parity (issue 3): diffusers `WanImageToVideoPipeline` vs `wanjax.pipeline.WanI2VPipeline`.

Tiny random torch components (two `WanTransformer3DModel` experts, `AutoencoderKLWan`, `UMT5EncoderModel`, a
word-level tokenizer) are saved in the diffusers layout, loaded by `WanI2VPipeline.from_pretrained`, and both
pipelines run on the same image, prompts, frames, size, steps, guidance, schedule and injected starting noise.
The final latents (before the VAE decode) must agree within 1e-4 relative in fp32.

Known, intentional differences between the two pipelines are neutralised here (each one is commented where it is
handled): image resize filter, sigma schedule, guidance-scale order, noise layout.
"""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from helpers_diffusers import official_unipc, perturb_vae_norms  # noqa: E402
from test_io_common import diffusers_model, tiny_cfg  # noqa: E402
from wanjax import conditioning  # noqa: E402
from wanjax.pipeline import WanI2VPipeline  # noqa: E402
from wanjax.sampling import flow_schedule, official_sigma_max  # noqa: E402

H, W, FRAMES, STEPS, SHIFT, BOUNDARY = 32, 48, 5, 6, 5.0, 0.9
GUIDE_HIGH, GUIDE_LOW = 4.0, 3.0  # distinct, so a swapped (low, high) order would fail
T5_DIM = 32
WORDS = ["a", "cat", "dog", "runs", "on", "the", "grass", "big", "red", "blurry", "static"]
PROMPT, NEGATIVE = "a big red cat runs on the grass", "blurry static dog"


def _write_tokenizer(folder) -> None:
    """A word-level umT5-style tokenizer (pad 0, EOS 1 appended, unk 2) saved with `save_pretrained`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)


def _t5():
    torch.manual_seed(1)
    cfg = transformers.UMT5Config(
        vocab_size=64,
        d_model=T5_DIM,
        num_heads=2,
        d_kv=16,
        d_ff=48,
        num_layers=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
    )
    m = transformers.UMT5EncoderModel(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms / relative-position biases, O(1) activations
        for name, p in m.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name or "shared" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return m


def _vae():
    torch.manual_seed(2)
    z = 16
    mean = (0.2 * torch.randn(z)).tolist()  # non-default latents_mean/std: normalisation must be read
    std = (1.0 + 0.5 * torch.rand(z)).tolist()  # from vae/config.json by both sides
    m = (
        diffusers.AutoencoderKLWan(
            base_dim=8,
            z_dim=z,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=mean,
            latents_std=std,
        )
        .float()
        .eval()
    )
    return perturb_vae_norms(m)


def _scheduler():
    """diffusers FlowUniPC as the official sampler, with the official sigmas injected.

    The diffusers pipeline calls ``scheduler.set_timesteps(num_inference_steps)``, which would build its own flow
    sigmas (linspace(1, 1/1000), not the official schedule). We route that call to
    ``set_timesteps(sigmas=linspace(0.999f32, 0, N+1)[:-1])``: diffusers applies ``flow_shift`` to the given sigmas,
    which yields exactly `wanjax.sampling.flow_schedule(N, shift)` (checked below)."""
    s = official_unipc(diffusers, SHIFT)
    orig = s.set_timesteps

    def set_official(num_inference_steps=None, device=None, **kw):
        return orig(sigmas=np.linspace(official_sigma_max(), 0.0, num_inference_steps + 1)[:-1], device=device)

    s.set_timesteps = set_official
    return s


def _rel(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return (float(np.abs(got - ref).max() / np.abs(ref).max()), float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))


def test_whole_pipeline_matches_diffusers(tmp_path):
    # ---- tiny random components, saved in the diffusers layout
    dcfg = tiny_cfg(dim=32, heads=2, layers=2, ffn=48, text_dim=T5_DIM, freq=16)  # in 36, out 16 (I2V)
    high, low = diffusers_model(dcfg, seed=10), diffusers_model(dcfg, seed=20)
    vae, t5 = _vae(), _t5()
    high.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    low.save_pretrained(tmp_path / "transformer_2", safe_serialization=True)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    t5.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    _write_tokenizer(tmp_path / "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")

    ref_pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=t5,
        vae=vae,
        scheduler=_scheduler(),
        transformer=high,
        transformer_2=low,
        image_encoder=None,
        image_processor=None,
        boundary_ratio=BOUNDARY,
    )
    ref_pipe.set_progress_bar_config(disable=True)

    # ---- same image, already at the output size: diffusers resizes with PIL lanczos, wanjax with torch-exact
    # bicubic; at the identical size neither resamples (PIL returns a copy, bicubic at scale 1 is the identity).
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    area = H * W
    assert conditioning.i2v_size((H, W), area) == (H, W)
    from PIL import Image

    pil = Image.fromarray(image)

    # ---- same starting noise: diffusers [B, C, F, h, w], wanjax [1, F, h, w, C]
    f_lat, h_lat, w_lat = (FRAMES - 1) // 4 + 1, H // 8, W // 8
    noise = rng.standard_normal((1, f_lat, h_lat, w_lat, 16), dtype=np.float32)

    # ---- diffusers reference. guidance_scale -> transformer (t >= 0.9 * 1000), guidance_scale_2 -> transformer_2;
    # the condition latent is the VAE mode (argmax) normalised by vae.config latents_mean/std; text zero-padded to
    # max_sequence_length=512 (= the wanjax DiT's text_len from config_from_dict's default).
    with torch.no_grad():
        ref = ref_pipe(
            image=pil,
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            height=H,
            width=W,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=GUIDE_HIGH,
            guidance_scale_2=GUIDE_LOW,
            latents=torch.from_numpy(noise.transpose(0, 4, 1, 2, 3).copy()),
            max_sequence_length=512,
            output_type="latent",
            return_dict=False,
        )[0]
    ref = ref.numpy().transpose(0, 2, 3, 4, 1)  # -> [1, F, h, w, 16]

    sched = flow_schedule(STEPS, SHIFT)
    np.testing.assert_array_equal(ref_pipe.scheduler.sigmas.numpy(), sched.sigmas)
    np.testing.assert_array_equal(ref_pipe.scheduler.timesteps.numpy(), sched.timesteps)

    # ---- wanjax, loaded from the saved diffusers layout. guide_scale is (low-noise, high-noise), as the official
    # config; wanjax's condition latent is the VAE mean mu (= diffusers' mode), normalised by its VAE cfg which
    # the loader reads from vae/config.json.
    pipe = WanI2VPipeline.from_pretrained(tmp_path, dtype=jnp.float32)
    assert pipe.cfg.text_len == 512
    out = pipe.generate(
        image,
        PROMPT,
        NEGATIVE,
        num_frames=FRAMES,
        max_area=area,
        steps=STEPS,
        shift=SHIFT,
        guide_scale=(GUIDE_LOW, GUIDE_HIGH),
        boundary=BOUNDARY,
        solver="unipc",
        noise=noise,
        progress=False,
    )
    assert out.experts == ["high"] * 3 + ["low"] * 3  # both experts run (shift 5, 6 steps: 3 + 3)
    np.testing.assert_array_equal(out.timesteps, sched.timesteps)
    assert out.latents.shape == ref.shape == (1, f_lat, h_lat, w_lat, 16)

    err_max, err_l2 = _rel(out.latents, ref)
    print(f"final latents: max-abs relative error {err_max:.3g}, L2 relative error {err_l2:.3g}")
    assert np.abs(ref - noise).max() > 0.1  # the run moved the latents away from the noise
    assert err_max <= 1e-4, f"final latents differ: max-abs relative error {err_max:.3g} > 1e-4 (L2 {err_l2:.3g})"
