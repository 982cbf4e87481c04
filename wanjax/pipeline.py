"""Image-to-video generation with the two Wan2.2 experts: encode -> denoise (expert switch, CFG) -> decode.

One jitted function (the classifier-free-guided forward of one expert) takes the expert's parameters as an argument,
so a single compilation serves both experts; the loop is `wanjax.sampling.sample`, the project's one denoise loop.

    pipe = WanI2VPipeline.from_pretrained("Wan2.2-I2V-A14B")        # official layout (or diffusers layout)
    out = pipe("input.jpg", "a cat surfing", seed=0)                  # 81 frames, 40 steps, shift 5, guide 3.5/3.5
    save_mp4(out.frames, "out.mp4", fps=16)
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax import conditioning
from wanjax.generation_config import GenerationConfig  # noqa: F401  (re-exported)
from wanjax.model.dit import WanDiT
from wanjax.sampling import flow_schedule, sample
from wanjax.video_io import to_uint8

#: Official default negative prompt (``sample_neg_prompt`` in Wan2.2's shared config).
DEFAULT_NEGATIVE_PROMPT = conditioning.NEGATIVE_PROMPT


@dataclasses.dataclass
class I2VOutput:
    """Result of a generation: uint8 frames [F, H, W, 3], final latents, and what ran at each step."""

    frames: np.ndarray
    latents: np.ndarray
    timesteps: np.ndarray
    experts: list[str]
    seconds: dict[str, float]


def _guided_velocity(graphdef, params, x, y, ctx, t, guide, constrain=None):
    """Classifier-free-guided velocity of one expert at (x, t). ctx: [2, L, D] = (cond, uncond), batched as 2B.

    ``constrain`` (mesh runs): applied to each batched model input, e.g. to split (cond, uncond) over "data"."""
    model = nnx.merge(graphdef, params)
    inp = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
    b = x.shape[0]
    args = (jnp.concatenate([inp, inp], 0), jnp.full((2 * b,), t, jnp.float32),
            jnp.repeat(ctx, b, axis=0) if b > 1 else ctx)
    if constrain is not None:
        args = tuple(constrain(a) for a in args)
    v = model(*args)
    v_cond, v_uncond = v[:b], v[b:]
    return v_uncond + guide * (v_cond - v_uncond)


class WanI2VPipeline:
    """The Wan2.2 I2V pipeline over two DiT experts, a Wan VAE, and a UMT5 encoder + tokenizer.

    Args:
      high, low: the high-noise (t >= boundary * 1000) and low-noise experts (`WanDiT`, same config and dtype).
      vae: `wanjax.model.vae.WanVAE`.
      text_encoder, tokenizer: `wanjax.model.t5.UMT5Encoder` and `wanjax.text.PromptTokenizer`; may be None if
        contexts are passed to `generate` directly.
      release_text_encoder: drop the text encoder after the first encoding (frees its memory; the official code
        offloads it too).
      mesh: optional `jax.sharding.Mesh` from `wanjax.sharding.make_mesh`: the experts' weights are sharded by the
        rule table, the denoise step runs with CFG's (cond, uncond) over "data" and sequence-parallel attention
        (``attention_mode``: "auto", "ulysses" or "ring") over "context". Text encoder and VAE run unsharded.
      expert_placement: "device" keeps both experts on the accelerator; "swap" keeps only the active one there and the
        other in host memory, swapping once per video at the boundary (timesteps only decrease); "auto" (default)
        picks "swap" when the two experts take more than 60 % of the device's memory (e.g. two BF16 A14B experts,
        57 GB, on an 80 GB card), else "device". Ignored (always "device") with a mesh.
    """

    def __init__(self, high: WanDiT, low: WanDiT, vae, text_encoder=None, tokenizer=None, *,
                 release_text_encoder: bool = False, mesh=None, attention_mode: str = "auto",
                 expert_placement: str = "auto"):
        g_high, self._params_high = nnx.split(high)
        g_low, self._params_low = nnx.split(low)
        if g_high != g_low:
            raise ValueError("the two experts must share config and dtype (their module graphs differ)")
        self.graphdef = g_high
        self.cfg = high.cfg
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.release_text_encoder = release_text_encoder
        self.mesh = mesh
        self.attention_mode = attention_mode
        if mesh is not None:
            self._params_high, self._params_low = self._shard(self._params_high), self._shard(self._params_low)
        self._velocity = self._jit_velocity(_guided_velocity)
        self.expert_placement = "device" if mesh is not None else self._choose_placement(expert_placement)
        self.swaps = 0
        self._resident = "high"
        if self.expert_placement == "swap":
            self._params_low = jax.device_get(self._params_low)        # host memory until the boundary

    def _shard(self, params):
        from wanjax import sharding

        return sharding.shard_params(params, self.mesh)

    def _jit_velocity(self, velocity_fn: Callable) -> Callable:
        """``velocity_fn(graphdef, params, x, y, ctx, t, guide, constrain=None)`` jitted for this pipeline: plain
        ``jax.jit`` on one device, `wanjax.sharding.sharded_velocity` on a mesh."""
        g = self.graphdef
        if self.mesh is None:
            return jax.jit(lambda params, x, y, ctx, t, guide: velocity_fn(g, params, x, y, ctx, t, guide))
        from wanjax import sharding

        return sharding.sharded_velocity(velocity_fn, g, self.mesh, mode=self.attention_mode)

    def replace_experts(self, high: nnx.Module, low: nnx.Module, velocity: Callable | None = None) -> None:
        """Denoise with other experts from now on (e.g. quantized ones from `wanjax.quant`).

        ``high`` and ``low`` must share one module graph. ``velocity`` is the guided velocity
        ``fn(graphdef, params, x, y, ctx, t, guide, constrain=None)`` (default: the plain one), jitted here; with a
        mesh the experts' parameters are sharded by the rule table and the velocity is jitted for the mesh. The
        expert placement policy is kept.
        """
        g_high, p_high = nnx.split(high)
        g_low, p_low = nnx.split(low)
        if g_high != g_low:
            raise ValueError("replace_experts: the two experts must have the same structure; their graphs differ")
        if self.mesh is not None:
            p_high, p_low = self._shard(p_high), self._shard(p_low)
        self.graphdef = g_high
        self._params_high, self._params_low = p_high, p_low
        self._velocity = self._jit_velocity(_guided_velocity if velocity is None else velocity)
        self._resident = "high"
        if self.expert_placement == "swap":
            self._params_low = jax.device_get(self._params_low)

    def _choose_placement(self, placement: str) -> str:
        if placement not in ("auto", "device", "swap"):
            raise ValueError(f"expert_placement must be 'auto', 'device' or 'swap', got {placement!r}")
        if placement != "auto":
            return placement
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if not limit:                                  # CPU: host memory is the device memory
            return "device"
        need = sum(x.nbytes for x in jax.tree.leaves((self._params_high, self._params_low)))
        return "swap" if need > 0.6 * limit else "device"

    def expert_params(self, name: str):
        """The parameters of expert ``name`` ("high" / "low"), on the device (swapping it in if needed)."""
        if self.expert_placement == "swap" and self._resident != name:
            other = "low" if name == "high" else "high"
            setattr(self, f"_params_{other}", jax.device_get(getattr(self, f"_params_{other}")))
            setattr(self, f"_params_{name}", jax.device_put(getattr(self, f"_params_{name}")))
            self._resident = name
            self.swaps += 1
        return getattr(self, f"_params_{name}")

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=jnp.bfloat16, **kw) -> "WanI2VPipeline":
        """Load from the official layout (``high_noise_model/``, ``low_noise_model/``, ``Wan2.1_VAE.pth``,
        ``models_t5_umt5-xxl-enc-bf16.pth``, ``google/umt5-xxl/``) or the diffusers layout (``transformer/``,
        ``transformer_2/``, ``vae/``, ``text_encoder/``, ``tokenizer/``)."""
        from wanjax.io.dit_loader import load_dit
        from wanjax.io.t5_loader import load_t5_encoder
        from wanjax.io.vae_loader import load_vae
        from wanjax.text import PromptTokenizer

        path = os.fspath(path)
        official = os.path.isdir(os.path.join(path, "high_noise_model"))
        diffusers = os.path.isdir(os.path.join(path, "transformer"))
        if not (official or diffusers):
            raise FileNotFoundError(f"{path}: expected the official layout (high_noise_model/, low_noise_model/, ...) "
                                    "or the diffusers layout (transformer/, transformer_2/, ...); found neither")
        if official:
            parts = {"high": "high_noise_model", "low": "low_noise_model", "vae": "Wan2.1_VAE.pth",
                     "t5": "models_t5_umt5-xxl-enc-bf16.pth", "tok": os.path.join("google", "umt5-xxl")}
        else:
            parts = {"high": "transformer", "low": "transformer_2", "vae": "vae", "t5": "text_encoder",
                     "tok": "tokenizer"}
        p = {k: os.path.join(path, v) for k, v in parts.items()}
        missing = [parts[k] for k, v in p.items() if not os.path.exists(v)]
        if missing:
            raise FileNotFoundError(f"{path}: incomplete {'official' if official else 'diffusers'} layout, missing "
                                    f"{missing}")
        high = load_dit(p["high"], dtype=dtype)
        low = load_dit(p["low"], dtype=dtype)
        vae = load_vae(p["vae"], dtype=dtype)
        t5 = load_t5_encoder(p["t5"], dtype=dtype, param_dtype=dtype)
        tok = PromptTokenizer(p["tok"], text_len=high.cfg.text_len)
        return cls(high, low, vae, t5, tok, **kw)

    # ---------------------------------------------------------------- stages
    def encode_text(self, prompts: Sequence[str]) -> jax.Array:
        """Prompts -> context [B, text_len, text_dim] (zero-padded as Wan does)."""
        from wanjax.text import encode_prompts

        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError("this pipeline has no text encoder/tokenizer (released or never loaded): pass "
                               "`context=` to generate()")
        ctx, _ = encode_prompts(self.text_encoder, self.tokenizer, list(prompts), pad_to=self.cfg.text_len)
        if self.release_text_encoder:
            self.text_encoder = None
        return ctx

    def prepare_condition(self, image, num_frames: int, max_area) -> tuple[jax.Array, tuple[int, int]]:
        """Image -> y [1, F_lat, h, w, 20] (4 mask + 16 VAE latent channels) and the pixel size (H, W)."""
        from wanjax.model.vae import encode_video

        img = conditioning.preprocess_image(image, max_area)                  # [H, W, 3] in [-1, 1]
        video = conditioning.i2v_video(img, num_frames)                       # [F, H, W, 3]
        lat = encode_video(self.vae, jnp.asarray(video)[None])               # [1, F_lat, h, w, 16]
        mask = conditioning.i2v_mask(num_frames, lat.shape[2], lat.shape[3])
        y = conditioning.concat_condition(jnp.asarray(mask), lat)
        return y.astype(jnp.float32), img.shape[:2]

    def expert_for(self, t: int, boundary: float) -> str:
        """``"high"`` if ``t >= boundary * num_train_timesteps`` else ``"low"`` (as the official code)."""
        return "high" if t >= boundary * self.cfg.num_train_timesteps else "low"

    def denoise(self, y: jax.Array, context: jax.Array, gen: GenerationConfig, noise: jax.Array | None = None,
                progress: bool = True, velocity_fn: Callable | None = None) -> tuple[jax.Array, list[str]]:
        """The denoise loop: official FlowUniPC/Euler schedule, expert switch at the boundary, CFG per expert.

        ``context``: [2, L, D] (positive, negative). ``noise``: the starting latent [1, F_lat, h, w, 16] (drawn from
        ``gen.seed`` when None). ``velocity_fn(expert, params, x, y, context, t, guide) -> v`` replaces the guided
        velocity (calibration records the trajectory through it). Returns the final latents and the expert used at
        each step.
        """
        sched = flow_schedule(gen.steps, shift=gen.shift)
        shape = y.shape[:-1] + (self.cfg.out_dim,)
        x = jax.random.normal(jax.random.key(gen.seed), shape, jnp.float32) if noise is None \
            else jnp.asarray(noise, jnp.float32)
        if x.shape != shape:
            raise ValueError(f"noise shape {x.shape} does not match the latent shape {shape}")
        guide_low, guide_high = gen.guide_scale
        experts: list[str] = []
        bar = _progress(gen.steps, progress)

        def model_fn(x, t, i):
            t = int(t)
            name = self.expert_for(t, gen.boundary)
            experts.append(name)
            params = self.expert_params(name)
            guide = guide_high if name == "high" else guide_low
            if velocity_fn is not None:
                return velocity_fn(name, params, x, y, context, jnp.float32(t), jnp.float32(guide))
            return self._velocity(params, x, y, context, jnp.float32(t), jnp.float32(guide))

        def callback(i, t, x):
            if bar is not None:
                jax.block_until_ready(x)
                bar.set_postfix_str(f"t={t} expert={experts[-1]}")
                bar.update(1)

        x = sample(model_fn, x, sched, gen.solver, unroll=True, callback=callback)
        if bar is not None:
            bar.close()
        return x, experts

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents -> video [F, H, W, 3] in [-1, 1] (one latent frame at a time inside the VAE)."""
        from wanjax.model.vae import decode_video

        if self.mesh is not None:          # latents live on the mesh; the VAE runs on one device
            latents = jax.device_put(latents, jax.tree.leaves(nnx.state(self.vae))[0].sharding)
        return decode_video(self.vae, latents)[0]

    # ---------------------------------------------------------------- all together
    def generate(self, image, prompt: str | None = None, negative_prompt: str | None = None,
                 gen: GenerationConfig | None = None, *, context: jax.Array | None = None,
                 noise: jax.Array | None = None, progress: bool = True, **overrides) -> I2VOutput:
        """Generate a video from an image (path, PIL image or uint8 [H, W, 3]) and a prompt.

        ``overrides`` update fields of ``gen`` (e.g. ``steps=20, seed=1``). ``context`` ([2, L, D]: positive,
        negative) skips the text encoder.
        """
        gen = dataclasses.replace(gen or GenerationConfig(), **overrides)
        conditioning.check_num_frames(gen.num_frames)
        times = {}
        t0 = time.perf_counter()
        if context is None:
            if prompt is None:
                raise ValueError("generate() needs a prompt (or a precomputed context)")
            neg = DEFAULT_NEGATIVE_PROMPT if not negative_prompt else negative_prompt
            context = self.encode_text([prompt, neg])
        times["text"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        y, _ = self.prepare_condition(image, gen.num_frames, gen.max_area)
        jax.block_until_ready(y)
        times["vae_encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        latents, experts = self.denoise(y, context, gen, noise=noise, progress=progress)
        jax.block_until_ready(latents)
        times["denoise"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        video = self.decode(latents)
        frames = to_uint8(np.asarray(video))
        times["vae_decode"] = time.perf_counter() - t0
        sched = flow_schedule(gen.steps, shift=gen.shift)
        return I2VOutput(frames=frames, latents=np.asarray(latents), timesteps=np.asarray(sched.timesteps),
                         experts=experts, seconds=times)

    def __call__(self, image, prompt: str | None = None, negative_prompt: str | None = None, **kw) -> np.ndarray:
        """``pipe(image, prompt, ...)``: `generate` returning only the uint8 frames [F, H, W, 3]."""
        return self.generate(image, prompt, negative_prompt, **kw).frames


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="denoise", unit="step")
