"""Checkpoint I/O for the Wan2.2 DiT: safetensors streaming, key maps, validation, loading, orbax cache.

Public API: `load_dit` (any published layout or a converted cache -> `WanDiT`), `convert` (-> orbax cache),
`CheckpointError` (raised for unusable checkpoints). orbax is imported only when a cache is written or read.

DiT modules, bottom up: `safetensors_stream` (headers, chunked reads) / `keymap` (official, diffusers, ComfyUI and
wanjax names) / `validate`; `dit_source` (what a path is); `dit_params` (the parameter tree, streaming conversion,
NaN/Inf check, model assembly); then `dit_loader` (`load_dit`, dispatching) and `orbax_cache` (`convert`,
`load_cached`), which both build on the two below and not on each other ("where is" table: docs/ARCHITECTURE.md).
"""

from wanjax.io.dit_loader import load_dit
from wanjax.io.errors import CheckpointError


def convert(src, dst, *args, **kwargs):
    """Convert a DiT checkpoint into an orbax cache; see `wanjax.io.orbax_cache.convert`."""
    from wanjax.io.orbax_cache import convert as _convert

    return _convert(src, dst, *args, **kwargs)


__all__ = ["load_dit", "convert", "CheckpointError"]
