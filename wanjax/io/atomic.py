"""Atomic publication of a directory written under a temporary name."""
from __future__ import annotations

import os
import shutil
import tempfile


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``), else via `os.umask`."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)   # not thread-safe, only where /proc is missing
    os.umask(mask)
    return mask


def normalize_modes(root: str) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open(..., "w")`` would: directories
    ``0o777 & ~umask``, files ``0o666 & ~umask`` (executable bits kept), so that a tree built under
    ``tempfile.mkdtemp`` (mode 0700) or with ``mkstemp`` files (0600) is published readable as usual."""
    mask = current_umask()
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    for d, dirs, files in os.walk(root):
        os.chmod(d, dmode)
        for name in files:
            p = os.path.join(d, name)
            if os.path.islink(p):
                continue
            os.chmod(p, fmode | (os.stat(p).st_mode & 0o111 & ~mask))


def make_temp_dir(dst: str | os.PathLike, tag: str = "tmp") -> str:
    """A fresh hidden temporary directory beside ``dst`` (same filesystem, so `publish_dir` can rename it)."""
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.{tag}-", dir=parent)


def publish_dir(tmp: str, dst: str, *, inputs=(), what: str = "output") -> str:
    """Rename the finished directory ``tmp`` to ``dst``; an existing ``dst`` is moved aside first and removed after,
    so ``dst`` is never half-written (``tmp`` and ``dst`` must be on one filesystem).

    ``inputs``: the paths the output was made from; publishing refuses (``ValueError``, see `check_not_overlapping`)
    when ``dst`` is, contains or lies inside one of them, so replacing ``dst`` can never delete an input. Modes under
    ``tmp`` are normalized to the umask first (`normalize_modes`: ``mkdtemp`` makes 0700). If the final rename fails
    (or is interrupted) the previous ``dst`` is put back.
    """
    check_not_overlapping(dst, *inputs, what=what)
    normalize_modes(tmp)
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return dst
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(os.path.abspath(dst)))
    aside = os.path.join(old, "x")
    os.rename(dst, aside)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if not os.path.lexists(dst):
            os.rename(aside, dst)   # put the previous version back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)   # does not follow a symlink that was dst
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
