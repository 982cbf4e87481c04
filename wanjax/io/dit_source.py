"""Where a DiT checkpoint is: `resolve` a path (file, index json, expert dir, converted cache) to a `CheckpointSource`.

Shared by `wanjax.io.dit_loader` (which loads what it finds) and `wanjax.io.orbax_cache` (which converts it); it
reads only file names and safetensors headers, never tensor data. The accepted forms are listed in
`wanjax.io.dit_loader`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import warnings

from wanjax.io import keymap
from wanjax.io.errors import CheckpointError
from wanjax.io.safetensors_stream import read_header, read_index

#: The metadata file that marks a directory written by `wanjax.io.orbax_cache.convert`.
ORBAX_MARKER = "wanjax_dit.json"


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint location.

    kind: ``"safetensors"`` or ``"orbax"``. files: shard paths (safetensors). index/index_path: the weight map
    when an index json is used. config_path: the ``config.json`` to read, if any.
    """

    path: str
    kind: str
    files: tuple[str, ...] = ()
    index: dict[str, str] | None = None
    index_path: str | None = None
    config_path: str | None = None


def _sibling_config(d: str) -> str | None:
    p = os.path.join(d, "config.json")
    return p if os.path.isfile(p) else None


def _index_source(path: str) -> CheckpointSource:
    index = read_index(path)
    files = tuple(dict.fromkeys(index.values()))  # unique, in first-use order
    return CheckpointSource(path, "safetensors", files, index, path, _sibling_config(os.path.dirname(path) or "."))


#: Extensions of other checkpoint formats that an expert dir should not hold next to its safetensors (ignored with a
#: warning naming them).
OTHER_CHECKPOINT_EXTS = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")


def _holds_dit_weights(path: str) -> bool:
    """Whether the safetensors file ``path`` holds any Wan DiT parameter (header only); False if unreadable."""
    try:
        return any(keymap.is_dit_key(k) for k in read_header(path))
    except CheckpointError:
        return False


def _resolve_dir(path: str) -> CheckpointSource:
    marker = os.path.join(path, ORBAX_MARKER)
    indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    names = lambda ps: [os.path.basename(p) for p in ps]  # noqa: E731
    if os.path.isfile(marker):
        if indexes or files:
            raise CheckpointError(
                f"{path}: ambiguous: holds both a converted wanjax cache ({ORBAX_MARKER}, params/) and safetensors "
                f"checkpoint file(s) {names(indexes + files)[:8]}; move one of them out of the directory (pass "
                "the *.safetensors.index.json or .safetensors file itself to load the safetensors)"
            )
        return CheckpointSource(path, "orbax")
    others = sorted(
        f
        for f in os.listdir(path)
        if f.lower().endswith(OTHER_CHECKPOINT_EXTS) and os.path.isfile(os.path.join(path, f))
    )
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: ambiguous: several index files, pass one of them explicitly: {names(indexes)}")
    if indexes:
        src = _index_source(indexes[0])
        used = {os.path.realpath(f) for f in src.files}
        stray = [f for f in files if os.path.realpath(f) not in used]
        second = [f for f in stray if _holds_dit_weights(f)]
        if second:
            raise CheckpointError(
                f"{path}: ambiguous: two checkpoints: the index {os.path.basename(indexes[0])} (shards "
                f"{names(src.files)[:4]}{' ...' if len(src.files) > 4 else ''}) and {names(second)}, which the "
                "index does not list but which hold Wan DiT weights; pass the index json or the .safetensors file "
                "itself, or remove the one you do not want",
                [f"{f}: not in {indexes[0]}" for f in second],
            )
        for f in stray + [os.path.join(path, o) for o in others]:
            warnings.warn(
                f"{path}: ignoring {os.path.basename(f)}: not part of the checkpoint {os.path.basename(indexes[0])}",
                stacklevel=3,
            )
        return src
    if len(files) == 1:
        for o in others:
            warnings.warn(
                f"{path}: ignoring {o}: not part of the checkpoint {os.path.basename(files[0])}", stacklevel=3
            )
        return CheckpointSource(path, "safetensors", (files[0],), config_path=_sibling_config(path))
    hints = [
        d
        for d in ("high_noise_model", "low_noise_model", "transformer", "transformer_2")
        if os.path.isdir(os.path.join(path, d))
    ]
    hint = f" (it has expert sub-directories: pass one of {hints})" if hints else ""
    if files:
        raise CheckpointError(
            f"{path}: {len(files)} .safetensors files but no *.safetensors.index.json to "
            f"tell how they fit together: {names(files)[:8]}"
        )
    if others and not hints:
        raise CheckpointError(
            f"{path}: no *.safetensors.index.json, *.safetensors or {ORBAX_MARKER} found, only "
            f"{others[:8]} (formats wanjax does not load: convert them to safetensors)"
        )
    raise CheckpointError(f"{path}: no *.safetensors.index.json, *.safetensors or {ORBAX_MARKER} found{hint}")


def resolve(path: str | os.PathLike) -> CheckpointSource:
    """Work out what ``path`` is (see the module docstring); `CheckpointError` / ``FileNotFoundError`` if unusable.

    A directory must hold exactly one checkpoint: a converted cache together with safetensors files, two index
    files, or an index plus a ``.safetensors`` file it does not list that holds DiT weights (a second checkpoint)
    are refused naming both; other files the index does not list, and files of other checkpoint formats
    (``.bin``, ``.pth``, ``.gguf`` ...), are ignored with a warning naming them.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if os.path.isdir(path):
        return _resolve_dir(path)
    if path.endswith(".json"):
        return _index_source(path)
    if path.endswith(".safetensors"):
        return CheckpointSource(path, "safetensors", (path,), config_path=_sibling_config(os.path.dirname(path) or "."))
    raise CheckpointError(f"{path}: expected a directory, a *.safetensors.index.json or a .safetensors file")
