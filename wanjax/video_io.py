"""Writing generated videos: mp4 through imageio-ffmpeg, optional PNG frames; atomic (temp file then rename)."""
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
