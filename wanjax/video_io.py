"""Writing generated videos: mp4 (ffmpeg from imageio-ffmpeg) or GIF, checked and atomic (temp file, verified, then
renamed), optional PNG frames.
Showing them in notebooks: `side_by_side`, `gif_bytes`, `video_html` (an inline animated GIF)."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Callable

import numpy as np

from wanjax.io.atomic import atomic_path


def to_uint8(video) -> np.ndarray:
    """Video in [-1, 1] (float, [F, H, W, 3]) -> uint8 [F, H, W, 3] (round to nearest)."""
    v = np.asarray(video, dtype=np.float32)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video [F, H, W, 3], got shape {v.shape}")
    return np.clip(np.rint((v + 1.0) * 127.5), 0, 255).astype(np.uint8)


class VideoWriteError(OSError):
    """The video writer failed or produced a file that does not hold the frames (nothing is left at the path)."""


#: Output file extensions `save_video` can write.
VIDEO_EXTENSIONS = (".mp4", ".gif")


def _uint8_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"expected frames [F, H, W, 3] with F, H, W >= 1, got shape {frames.shape}")
    return frames


def _check_fps(fps) -> int:
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0:
        raise ValueError(f"fps: expected a positive integer, got {fps!r}")
    return int(fps)


def _run_quiet(cmd: list[str], stdin_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run`` for ffmpeg without ``preexec_fn`` (imageio-ffmpeg passes ``os.setpgrp``, which makes
    CPython run the fork handlers: JAX's "os.fork() was called" warning, and no vfork). ``process_group=0`` keeps
    the child out of our terminal's process group as ``setpgrp`` did (Ctrl-C reaches only us), without a fork hook."""
    kw = {"process_group": 0} if os.name == "posix" else {}
    return subprocess.run(cmd, input=stdin_bytes, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, **kw)


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _write_mp4_file(frames: np.ndarray, path: str, fps: int) -> None:
    """H.264 (libx264, yuv420p, crf 10: imageio's quality 8) through an ffmpeg subprocess fed raw RGB on stdin."""
    f, h, w, _ = frames.shape
    cmd = [
        _ffmpeg_exe(),
        "-y",
        "-v",
        "error",
        "-f",
        "rawvideo",
        "-vcodec",
        "rawvideo",
        "-s",
        f"{w}x{h}",
        "-pix_fmt",
        "rgb24",
        "-r",
        str(fps),
        "-i",
        "-",
        "-an",
        "-vcodec",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-crf",
        "10",
    ]
    if h % 2 or w % 2:  # yuv420p needs even sides: pad one black row / column
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
    cmd += ["-f", "mp4", path]
    r = _run_quiet(cmd, np.ascontiguousarray(frames).tobytes())
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        raise VideoWriteError(
            f"{path}: ffmpeg failed with exit status {r.returncode}" + (f": {err[-1]}" if err else "")
        )


def _mp4_boxes(path: str) -> dict[str, int]:
    """Top-level MP4 boxes ``{type: size}``; raises `VideoWriteError` if a box runs past the end of the file."""
    size = os.path.getsize(path)
    boxes, pos = {}, 0
    with open(path, "rb") as fh:
        while pos < size:
            fh.seek(pos)
            head = fh.read(16)
            if len(head) < 8:
                raise VideoWriteError(f"{path}: truncated MP4 box header at byte {pos} of {size}")
            n, kind = int.from_bytes(head[:4], "big"), head[4:8].decode("latin-1")
            if n == 1 and len(head) == 16:
                n = int.from_bytes(head[8:16], "big")
            elif n == 0:
                n = size - pos
            if n < 8 or pos + n > size:
                raise VideoWriteError(
                    f"{path}: MP4 box {kind!r} at byte {pos} claims {n} bytes, the file has "
                    f"{size - pos} left (truncated or corrupt)"
                )
            boxes[kind] = boxes.get(kind, 0) + n
            pos += n
    return boxes


def count_mp4_frames(path: str | os.PathLike) -> int:
    """Video frames in an mp4 (ffmpeg stream copy, no decode); raises `VideoWriteError` if ffmpeg cannot read it."""
    path = os.fspath(path)
    r = _run_quiet(
        [_ffmpeg_exe(), "-v", "error", "-stats", "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]
    )
    text = r.stderr.decode(errors="replace")
    found = re.findall(r"frame=\s*(\d+)", text)
    if r.returncode != 0 or not found:
        lines = [ln for ln in text.strip().splitlines() if "frame=" not in ln]
        raise VideoWriteError(
            f"{path}: not a readable video (ffmpeg exit status {r.returncode}"
            + (f": {lines[-1]}" if lines else "")
            + ")"
        )
    return int(found[-1])


def check_mp4(path: str | os.PathLike, num_frames: int) -> None:
    """Raise `VideoWriteError` unless ``path`` is a complete mp4 (``ftyp``, ``moov`` and ``mdat`` boxes inside the
    file) holding ``num_frames`` video frames."""
    path = os.fspath(path)
    boxes = _mp4_boxes(path)
    missing = [b for b in ("ftyp", "moov", "mdat") if b not in boxes]
    if missing:
        raise VideoWriteError(f"{path}: incomplete MP4, no {missing} box (found {sorted(boxes)})")
    got = count_mp4_frames(path)
    if got != num_frames:
        raise VideoWriteError(f"{path}: expected {num_frames} frames in the written video, got {got}")


def check_gif(path: str | os.PathLike, num_frames: int, fps: int) -> None:
    """Raise `VideoWriteError` unless ``path`` is a readable GIF lasting ``num_frames / fps`` seconds (identical
    consecutive frames may be merged by the encoder, so the duration is checked, not the frame count)."""
    from PIL import Image

    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            total = 0.0
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                im.load()
                total += float(im.info.get("duration", 0))
    except Exception as e:  # PIL raises several types for bad files
        raise VideoWriteError(f"{path}: not a readable GIF ({e})") from e
    want = 1000.0 * num_frames / fps
    if abs(total - want) > 10.0 * num_frames + 1:  # GIF delays are in units of 10 ms
        raise VideoWriteError(
            f"{path}: expected a GIF of {want:.0f} ms ({num_frames} frames at {fps} fps), got {total:.0f} ms"
        )


def _atomic_write(path: str, write: Callable[[str], None], check: Callable[[str], None]) -> str:
    """``write(tmp)`` then ``check(tmp)`` on a temporary sibling of ``path`` (`wanjax.io.atomic.atomic_path`, with
    the extension of ``path`` so the writer picks the format), then rename; the temporary file is removed on any
    error or interrupt, so ``path`` is either the complete new file or untouched."""
    with atomic_path(path, suffix=".tmp" + os.path.splitext(path)[1], fsync=False) as tmp:
        write(tmp)
        check(tmp)
    return path


def save_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> str:
    """Write frames [F, H, W, 3] (uint8, or float in [-1, 1]) to an H.264 mp4 at ``fps``; returns the path.

    Atomic and checked: written to a temporary sibling, verified (complete MP4 boxes, ``F`` frames readable by
    ffmpeg), then renamed; a failed write raises `VideoWriteError` and leaves nothing at ``path``. ffmpeg is started
    without a fork hook (no JAX "os.fork()" warning)."""
    frames, fps, path = _uint8_frames(frames), _check_fps(fps), os.fspath(path)
    return _atomic_write(
        path, lambda tmp: _write_mp4_file(frames, tmp, fps), lambda tmp: check_mp4(tmp, frames.shape[0])
    )


def save_gif(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> str:
    """Write frames [F, H, W, 3] as a looping animated GIF at ``fps`` (atomic and checked, as `save_mp4`)."""
    frames, fps, path = _uint8_frames(frames), _check_fps(fps), os.fspath(path)

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(gif_bytes(frames, fps=fps))

    return _atomic_write(path, write, lambda tmp: check_gif(tmp, frames.shape[0], fps))


def save_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> str:
    """`save_mp4` or `save_gif` by the extension of ``path`` (`VIDEO_EXTENSIONS`); other extensions raise
    ``ValueError``."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".mp4":
        return save_mp4(frames, path, fps)
    if ext == ".gif":
        return save_gif(frames, path, fps)
    raise ValueError(
        f"{os.fspath(path)}: expected a video file name ending in {' or '.join(VIDEO_EXTENSIONS)}, got "
        f"{ext or 'no extension'!r}"
    )


def save_pngs(frames: np.ndarray, folder: str | os.PathLike) -> list[str]:
    """Write uint8 frames as ``folder/frame_00000.png`` ...; returns the paths."""
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, f in enumerate(frames):
        p = os.path.join(folder, f"frame_{i:05d}.png")
        with atomic_path(p, suffix=".tmp.png", fsync=False) as tmp:
            imageio.imwrite(tmp, f)
        paths.append(p)
    return paths


def side_by_side(videos, gap: int = 4, gap_value: int = 255) -> np.ndarray:
    """Videos ``[F, H, W_i, 3]`` (same F and H; uint8, or float in [-1, 1]) -> one uint8 video, left to right,
    separated by ``gap`` columns of ``gap_value`` (white by default)."""
    vs = [np.asarray(v) if np.asarray(v).dtype == np.uint8 else to_uint8(v) for v in videos]
    if not vs:
        raise ValueError("side_by_side: no videos")
    if any(v.ndim != 4 or v.shape[-1] != 3 or v.shape[:2] != vs[0].shape[:2] for v in vs):
        raise ValueError(
            f"side_by_side: videos must be [F, H, W, 3] with the same F and H, got {[v.shape for v in vs]}"
        )
    sep = np.full(vs[0].shape[:2] + (gap, 3), gap_value, np.uint8)
    parts = [p for v in vs for p in (sep, v)][1:]
    return np.concatenate(parts, axis=2)


def gif_bytes(frames, fps: int = 8) -> bytes:
    """An animated, looping GIF of ``frames`` ``[F, H, W, 3]`` (uint8, or float in [-1, 1]) at ``fps``."""
    import io

    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"gif_bytes: expected frames [F, H, W, 3], got shape {frames.shape}")
    buf = io.BytesIO()
    imageio.mimsave(buf, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
    return buf.getvalue()


def video_html(frames, fps: int = 8, scale: int = 2, caption: str | None = None) -> str:
    """HTML showing ``frames`` as an inline base64 GIF (no file, no ffmpeg), enlarged ``scale`` times with sharp
    pixels, with an optional caption; in Jupyter or Colab: ``IPython.display.HTML(video_html(frames))``."""
    import base64
    import html

    frames = np.asarray(frames)
    data = base64.b64encode(gif_bytes(frames, fps)).decode("ascii")
    w = int(frames.shape[2]) * int(scale)
    img = (
        f'<img src="data:image/gif;base64,{data}" width="{w}" '
        'style="image-rendering: pixelated; image-rendering: crisp-edges;"/>'
    )
    cap = "" if caption is None else f"<figcaption>{html.escape(caption)}</figcaption>"
    return f'<figure style="margin: 0.5em 0">{img}{cap}</figure>'
