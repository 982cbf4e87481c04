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
