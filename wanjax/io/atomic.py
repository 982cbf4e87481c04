"""Atomic publication of a file or a directory written under a temporary name.

Files: `atomic_write` (a context manager yielding an open file), `atomic_path` (yielding a temporary path, for
writers that take a file name: imageio, ``torch.save``, ``np.savez``), `write_json_atomic`. Directories:
`make_temp_dir` + `publish_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
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
    mask = os.umask(0o022)  # not thread-safe, only where /proc is missing
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


#: The ``tag`` values of the temporary directories that `remove_stale_temps` may remove.
TEMP_TAGS = ("tmp", "old", "tmp-export")


def _temp_tag() -> str:
    return f"{socket.gethostname().replace(os.sep, '_')}-{os.getpid()}"


def make_temp_dir(dst: str | os.PathLike, tag: str = "tmp") -> str:
    """A fresh hidden temporary directory beside ``dst`` (same filesystem, so `publish_dir` can rename it), named
    ``.<name>.<tag>-<host>-<pid>-<random>`` so that `remove_stale_temps` can tell whose it is."""
    if tag not in TEMP_TAGS:
        raise ValueError(f"make_temp_dir: tag must be one of {TEMP_TAGS}, got {tag!r}")
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temps(dst)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.{tag}-{_temp_tag()}-", dir=parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists
        return True
    return True


def remove_stale_temps(dst: str | os.PathLike) -> list[str]:
    """Remove the temporary siblings of ``dst`` (from `make_temp_dir` / `publish_dir`) left by a process of this
    host that no longer runs (killed mid-write); returns their paths. Another host's, or a live process's, are
    kept."""
    dst = os.path.abspath(os.fspath(dst))
    parent, base = os.path.dirname(dst), os.path.basename(dst)
    pat = re.compile(
        rf"^\.{re.escape(base)}\.(?:{'|'.join(map(re.escape, TEMP_TAGS))})-"
        rf"{re.escape(socket.gethostname().replace(os.sep, '_'))}-(\d+)-[^/]+$"
    )
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = pat.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            p = os.path.join(parent, name)
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


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
    old = tempfile.mkdtemp(
        prefix=f".{os.path.basename(dst)}.old-{_temp_tag()}-", dir=os.path.dirname(os.path.abspath(dst))
    )
    aside = os.path.join(old, "x")
    os.rename(dst, aside)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if not os.path.lexists(dst):
            os.rename(aside, dst)  # put the previous version back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)  # does not follow a symlink that was dst
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
        raise ValueError(
            f"{what} {os.fspath(dst)} {rel} the input {os.fspath(src)}: refusing to write there (it "
            "would delete or change the input); choose another output path"
        )


# ------------------------------------------------------------------------------------------------------ files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp", *, fsync: bool = True):
    """Yield a fresh temporary path beside ``path`` (same directory, so the rename is atomic; ``suffix`` ends its
    name, e.g. ``".tmp.mp4"`` for a writer that picks the format by extension). When the block exits normally the
    file written there gets the mode of a plain ``open(..., "w")`` (``0o666 & ~umask``), is fsynced (``fsync``) and
    renamed onto ``path``; on any error or interrupt it is removed and ``path`` is untouched. The parent directory
    is created if missing."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=d)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None, fsync: bool = True):
    """``with atomic_write(path) as f: f.write(...)``: ``f`` is open (``mode``: ``"w"`` or ``"wb"``) on a temporary
    sibling of ``path`` that replaces ``path`` only when the block exits normally (flushed, fsynced, renamed); on
    an error the temporary file is removed and ``path`` keeps its old content (see `atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    if encoding is None and mode == "w":
        encoding = "utf-8"
    with atomic_path(path, fsync=False) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def write_json_atomic(
    path: str | os.PathLike, obj, *, indent: int | None = 1, sort_keys: bool = False, fsync: bool = True
) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (`atomic_write`); numpy values are converted
    (`wanjax.io.jsonio.json_default`). Returns the path."""
    from wanjax.io.jsonio import json_default

    with atomic_write(path, "w", fsync=fsync) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=json_default)
    return os.fspath(path)
