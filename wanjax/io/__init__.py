"""Checkpoint I/O for the Wan2.2 DiT: safetensors streaming, key maps, validation, loading, orbax cache.

Public API: `load_dit` (any published layout or a converted cache -> `WanDiT`), `convert` (-> orbax cache),
`CheckpointError` (raised for unusable checkpoints).
"""
from wanjax.io.dit_loader import load_dit
from wanjax.io.errors import CheckpointError
from wanjax.io.orbax_cache import convert

__all__ = ["load_dit", "convert", "CheckpointError"]
