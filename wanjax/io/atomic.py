"""Atomic publication of a directory written under a temporary name."""
from __future__ import annotations

import os
import shutil
import tempfile


def publish_dir(tmp: str, dst: str) -> str:
    """Rename the finished directory ``tmp`` to ``dst``; an existing ``dst`` is moved aside first and removed after,
    so ``dst`` is never half-written (``tmp`` and ``dst`` must be on one filesystem)."""
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(os.path.abspath(dst)))
        os.rename(dst, os.path.join(old, "x"))
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    return dst


def check_not_overlapping(dst: str | os.PathLike, *sources: str | os.PathLike | None, what: str = "output") -> None:
    """Raise ``ValueError`` if ``dst`` is, contains, or lies inside any of ``sources`` (resolved through symlinks).

    Used before ``--overwrite`` replaces a directory, so that a source (a model dir, an expert, calibration
    statistics) is never deleted by writing onto or around it. ``None`` sources are skipped."""
    d = os.path.realpath(os.fspath(dst))
    for src in sources:
        if src is None:
            continue
        s = os.path.realpath(os.fspath(src))
        if d == s:
            rel = "is"
        elif s.startswith(d.rstrip(os.sep) + os.sep):
            rel = "contains"
        elif d.startswith(s.rstrip(os.sep) + os.sep):
            rel = "is inside"
        else:
            continue
        raise ValueError(f"{what} {os.fspath(dst)} {rel} the input {os.fspath(src)}: refusing to write there (it "
                         "would delete or change the input); choose another output path")
