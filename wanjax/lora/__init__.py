"""LoRA for wanjax: read Wan2.2 LoRA files in the published formats, apply them to BF16 and W4A4 experts, the
Wan2.2-Lightning 4-step path. docs/LORA.md.

    import wanjax.lora as lora
    lora.apply_lora(pipe, "style.safetensors", expert="low", strength=0.8)   # returns its name
    lora.set_lora_strength(pipe, "style.safetensors", 0.5); lora.remove_lora(pipe)   # exact base again
    gen = lora.use_lightning(pipe, "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/")      # 4 steps, no CFG

On modules: ``lora.lora_model(dit, [(lora.read_lora(path, dit.cfg), 1.0)])`` -> a new `WanDiT` (BF16: merged; W4A4:
extra rank of each QLinear's low-rank branch, the smoothing and rotation folded into the down matrix).
"""

from wanjax.generation_config import LIGHTNING, lightning_schedule
from wanjax.lora.apply import fold_down, lora_model, lora_ranks, pad_lora_ranks, strip_lora
from wanjax.lora.formats import LoraError, LoraModule, LoraWeights, official_module, parse_lora, read_lora
from wanjax.lora.lightning import LIGHTNING_FILES, lightning_files, use_lightning
from wanjax.lora.manager import active_loras, apply_lora, remove_lora, set_lora_strength

__all__ = [
    "LIGHTNING",
    "LIGHTNING_FILES",
    "LoraError",
    "LoraModule",
    "LoraWeights",
    "active_loras",
    "apply_lora",
    "fold_down",
    "lightning_files",
    "lightning_schedule",
    "lora_model",
    "lora_ranks",
    "official_module",
    "pad_lora_ranks",
    "parse_lora",
    "read_lora",
    "remove_lora",
    "set_lora_strength",
    "strip_lora",
    "use_lightning",
]
