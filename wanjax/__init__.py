"""wanjax: Wan2.2-I2V-A14B in JAX/Flax with real W4A4 quantization.

Public API (stable):

* `load_dit(path, dtype=jnp.bfloat16)` - one DiT expert from an official expert dir, a diffusers transformer dir,
  a ``*.safetensors.index.json``, a single ``.safetensors`` file (official / diffusers / ComfyUI keys) or a
  converted orbax cache; returns a `WanDiT` callable as ``dit(x, t, context)``.
* `convert(src, dst)` - write an orbax cache of converted params (faster to load than re-converting).
* `I2VPipeline.from_pretrained(dir_or_repo_id)` (= `wanjax.pipeline.WanI2VPipeline`): image-to-video with both
  experts; ``pipe(image, prompt)`` returns uint8 frames [F, H, W, 3], ``pipe.generate(...)`` the full `I2VOutput`;
  settings default to the model's own (``pipe.generation_defaults``, a `GenerationConfig`).
* `NonFiniteError` - raised when a NaN/Inf appears during generation (names the expert, step and layer).
* `WanDiT`, `WanConfig` and the presets `I2V_A14B`, `TINY`; `config_from_json`.
"""

from wanjax._lazy import lazy_getattr
from wanjax.config import I2V_A14B, TINY, WanConfig, config_from_json

__version__ = "0.1.0"

_LAZY = {
    "load_dit": ("wanjax.io.dit_loader", "load_dit"),
    "convert": ("wanjax.io.orbax_cache", "convert"),
    "CheckpointError": ("wanjax.io.errors", "CheckpointError"),
    "WanDiT": ("wanjax.model.dit", "WanDiT"),
    "I2VPipeline": ("wanjax.pipeline", "WanI2VPipeline"),
    "GenerationConfig": ("wanjax.generation_config", "GenerationConfig"),
    "NonFiniteError": ("wanjax.nonfinite", "NonFiniteError"),
    "mini_model_path": ("wanjax.mini", "mini_model_path"),
}


__getattr__ = lazy_getattr("wanjax", _LAZY)


__all__ = ["WanConfig", "I2V_A14B", "TINY", "config_from_json", "__version__", *_LAZY]
