"""wanjax: Wan2.2-I2V-A14B in JAX/Flax with real W4A4 quantization."""
from wanjax.config import I2V_A14B, TINY, WanConfig, config_from_json

__version__ = "0.1.0"

__all__ = ["WanConfig", "I2V_A14B", "TINY", "config_from_json", "__version__"]
