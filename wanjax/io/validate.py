"""Validate a checkpoint's tensor list against the expected official key set, before reading any weight.

Rules: every expected key present exactly once, with the expected shape and a float dtype among F32/BF16/F16;
keys that are not DiT parameters are an error listing them unless ``ignore_unknown=True``. All problems are
collected and raised together in one `CheckpointError` whose lines name file, key, expected and actual.
"""

from __future__ import annotations

import os

from wanjax.io.errors import CheckpointError
from wanjax.io.keymap import COMFY_PREFIX, official_to_diffusers, to_official
from wanjax.io.safetensors_stream import FLOAT_DTYPES, TensorInfo

_MAX_LISTED = 20


def _fmt_list(items: list[str]) -> str:
    head = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return head + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _disk_name(official: str, layout: str, comfy: bool) -> str:
    name = official_to_diffusers(official) if layout == "diffusers" else official
    return COMFY_PREFIX + name if comfy else name


def validate(
    infos: list[TensorInfo],
    expected: dict[str, tuple[int, ...]],
    *,
    layout: str,
    comfy: bool,
    source: str,
    ignore_unknown: bool = False,
) -> dict[str, TensorInfo]:
    """Check ``infos`` (on-disk tensors) against ``expected`` (official key -> PyTorch shape).

    Args:
      infos: every tensor found in the checkpoint files (duplicates included).
      expected: from `wanjax.io.keymap.official_shapes`.
      layout, comfy: from `wanjax.io.keymap.detect_layout`.
      source: the checkpoint path, used in messages.
      ignore_unknown: skip keys that are not parameters of this model instead of failing.

    Returns ``{official key: TensorInfo}`` of the tensors to load. Raises `CheckpointError` listing every problem.
    """
    problems: list[str] = []
    chosen: dict[str, TensorInfo] = {}
    seen: dict[str, list[TensorInfo]] = {}
    unknown: list[str] = []
    for t in infos:
        name = to_official(t.key, layout, comfy)
        if name is None or name not in expected:
            unknown.append(t.key)
            continue
        seen.setdefault(name, []).append(t)
    for name, ts in seen.items():
        if len(ts) > 1:
            where = ", ".join(f"{os.path.basename(t.file)}:{t.key}" for t in ts)
            problems.append(f"key {name!r} is present {len(ts)} times ({where}); expected exactly once")
            continue
        t = ts[0]
        disk = repr(t.key) if t.key == name else f"{t.key!r} (official {name!r})"
        if t.shape != tuple(expected[name]):
            problems.append(f"{t.file}: key {disk}: expected shape {tuple(expected[name])}, got {t.shape}")
        elif t.dtype not in FLOAT_DTYPES:
            problems.append(f"{t.file}: key {disk}: expected a float dtype ({'/'.join(FLOAT_DTYPES)}), got {t.dtype}")
        else:
            chosen[name] = t
    missing = [_disk_name(k, layout, comfy) for k in expected if k not in seen]
    if missing:
        problems.append(f"{source}: {len(missing)} expected key(s) missing: {_fmt_list(missing)}")
    if unknown and not ignore_unknown:
        problems.append(
            f"{source}: {len(unknown)} unknown key(s) that are not parameters of this model "
            f"(pass ignore_unknown=True to skip them): {_fmt_list(unknown)}"
        )
    if problems:
        msg = (
            f"{source}: checkpoint does not match the expected Wan DiT ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
        raise CheckpointError(msg, problems)
    return chosen
