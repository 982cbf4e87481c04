"""Writing generated videos: mp4 through imageio-ffmpeg, optional PNG frames; atomic (temp file then rename).
Showing them in notebooks: `side_by_side`, `gif_bytes`, `video_html` (an inline animated GIF)."""
from __future__ import annotations

import os

import numpy as np


def to_uint8(video) -> np.ndarray:
    """Video in [-1, 1] (float, [F, H, W, 3]) -> uint8 [F, H, W, 3] (round to nearest)."""
    v = np.asarray(video, dtype=np.float32)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video [F, H, W, 3], got shape {v.shape}")
    return np.clip(np.rint((v + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 16) -> str:
    """Write uint8 frames [F, H, W, 3] to an H.264 mp4 at ``fps``; returns the path."""
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1, ffmpeg_log_level="error") as w:
            for f in frames:
                w.append_data(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
        tmp = p + ".tmp.png"
        imageio.imwrite(tmp, f)
        os.replace(tmp, p)
        paths.append(p)
    return paths


def side_by_side(videos, gap: int = 4, gap_value: int = 255) -> np.ndarray:
    """Videos ``[F, H, W_i, 3]`` (same F and H; uint8, or float in [-1, 1]) -> one uint8 video, left to right,
    separated by ``gap`` columns of ``gap_value`` (white by default)."""
    vs = [np.asarray(v) if np.asarray(v).dtype == np.uint8 else to_uint8(v) for v in videos]
    if not vs:
        raise ValueError("side_by_side: no videos")
    if any(v.ndim != 4 or v.shape[-1] != 3 or v.shape[:2] != vs[0].shape[:2] for v in vs):
        raise ValueError(f"side_by_side: videos must be [F, H, W, 3] with the same F and H, got "
                         f"{[v.shape for v in vs]}")
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
    img = (f'<img src="data:image/gif;base64,{data}" width="{w}" '
           'style="image-rendering: pixelated; image-rendering: crisp-edges;"/>')
    cap = "" if caption is None else f"<figcaption>{html.escape(caption)}</figcaption>"
    return f"<figure style=\"margin: 0.5em 0\">{img}{cap}</figure>"
