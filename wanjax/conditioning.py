"""Image-to-video conditioning helpers, as the official ``Wan-Video/Wan2.2:wan/image2video.py``.

* output size from a maximum pixel area and the input image's aspect ratio, multiples of 16 (`i2v_size`);
* image to float32 in [-1, 1] and torch-compatible bicubic resize (`preprocess_image`, `bicubic_resize`);
* the VAE input ``[image, F - 1 black frames]`` (`i2v_video`);
* the 4-channel first-frame mask, channels-last ``[F_lat, lat_h, lat_w, 4]`` (`i2v_mask`) and
  ``y = concat(mask, image latent)`` with 4 + 16 = 20 channels (`concat_condition`);
* the official Chinese default negative prompt (`NEGATIVE_PROMPT`); prompt cleaning is `wanjax.text.clean_prompt`.

Resize choice: the official code resizes with ``torch.nn.functional.interpolate(mode="bicubic")`` (Keys kernel with
``a = -0.75``, half-pixel centres, edge samples clamped, **no antialiasing** even when shrinking).
``jax.image.resize(..., "bicubic")`` uses ``a = -0.5``, antialiases on downsampling and renormalises the weights at the
borders; PIL's bicubic also uses ``a = -0.5`` with antialiasing. Neither reproduces the official pixels, so
`bicubic_resize` implements the torch rule itself as two small interpolation matrices (host numpy, float32 result).
"""
from __future__ import annotations

import os
import re

import numpy as np

__all__ = [
    "NEGATIVE_PROMPT", "SIZE_PRESETS", "VAE_STRIDE", "PATCH_SIZE",
    "max_area_from_size", "i2v_size", "check_num_frames", "num_latent_frames",
    "load_image", "image_to_array", "bicubic_resize", "preprocess_image", "i2v_video",
    "i2v_mask", "concat_condition",
]

# Official `sample_neg_prompt` (wan/configs/shared_config.py), used when the negative prompt is empty.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Maximum pixel areas of the official sizes (MAX_AREA_CONFIGS); the aspect ratio comes from the image.
SIZE_PRESETS = {"480p": 480 * 832, "720p": 720 * 1280}
VAE_STRIDE = (4, 8, 8)   # (t, h, w)
PATCH_SIZE = (1, 2, 2)


def max_area_from_size(size) -> int:
    """Maximum pixel area for ``"480p"``, ``"720p"``, ``"W*H"`` / ``"WxH"`` (area W*H, as the official
    ``MAX_AREA_CONFIGS``), an ``(h, w)`` pair or an int area."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        area = int(size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        area = int(size[0]) * int(size[1])
    elif isinstance(size, str):
        key = size.strip().lower()
        if key in SIZE_PRESETS:
            area = SIZE_PRESETS[key]
        else:
            m = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", key)
            if not m:
                raise ValueError(f"size: expected '480p', '720p' or 'WxH' (e.g. '832x480'), got {size!r}")
            area = int(m.group(1)) * int(m.group(2))
    else:
        raise ValueError(f"size: expected a string, an (h, w) pair or an int area, got {size!r}")
    if area < 256:
        raise ValueError(f"size: area {area} is too small (need at least 16x16 pixels)")
    return area


def i2v_size(image_hw, max_area, vae_stride: int = VAE_STRIDE[1], patch: int = PATCH_SIZE[1]) -> tuple[int, int]:
    """Output ``(h, w)`` in pixels for an input image of ``image_hw``, as the official code computes it.

    ``lat = round(sqrt(max_area * ar) // stride // patch * patch)`` with ``ar = h0 / w0`` (``sqrt(max_area / ar)`` for
    the width), then ``h = lat_h * stride``: both sides are multiples of ``stride * patch = 16``, rounded down, so
    ``h * w <= max_area`` and the aspect ratio is kept up to that rounding.
    """
    h0, w0 = int(image_hw[0]), int(image_hw[1])
    if h0 <= 0 or w0 <= 0:
        raise ValueError(f"i2v_size: image size must be positive, got {image_hw}")
    max_area = max_area_from_size(max_area)
    aspect_ratio = h0 / w0
    lat_h = round(np.sqrt(max_area * aspect_ratio) // vae_stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // vae_stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"i2v_size: image {w0}x{h0} (WxH) has an aspect ratio too extreme for max area {max_area}: "
                         f"got latent {lat_w}x{lat_h}")
    return int(lat_h * vae_stride), int(lat_w * vae_stride)


def check_num_frames(num_frames: int) -> int:
    """Return ``num_frames`` if it is ``4n + 1`` (n >= 0), else raise naming the nearest valid counts."""
    f = int(num_frames)
    if f != num_frames or f < 1 or (f - 1) % VAE_STRIDE[0]:
        lo = max(1, (max(f, 1) - 1) // 4 * 4 + 1)
        raise ValueError(f"frames must be 4n+1 (1, 5, ..., 81), got {num_frames!r}; nearest valid: {lo} or {lo + 4}")
    return f


def num_latent_frames(num_frames: int) -> int:
    """Latent frames of a ``4n + 1``-frame video: ``(F - 1) // 4 + 1`` (81 -> 21)."""
    return (check_num_frames(num_frames) - 1) // VAE_STRIDE[0] + 1


def load_image(path) -> np.ndarray:
    """Read an image file as uint8 RGB ``[H, W, 3]`` (PIL, ``.convert("RGB")`` as the official ``generate.py``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in the 'video' extra
        raise ImportError("reading images needs Pillow: pip install 'wanjax[video]'") from e
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises several types for bad files
        raise ValueError(f"cannot read image {path}: {e}") from e


def image_to_array(image) -> np.ndarray:
    """A PIL image or uint8 ``[H, W, 3]`` array to float32 ``[H, W, 3]`` in [-1, 1] (``to_tensor``, -0.5, /0.5)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image: expected an RGB image [H, W, 3], got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image: expected dtype uint8 (0..255), got {arr.dtype}")
    x = arr.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)


def _cubic_taps(in_size: int, out_size: int, a: float = -0.75):
    """Indices ``[out, 4]`` (edge-clamped) and float32 weights ``[out, 4]`` of torch's bicubic along one axis
    (align_corners=False, no antialias)."""
    # torch (CPU) computes the source coordinate in float32 with one rounding (fused multiply-add):
    # scale = float32(in) / out, src = float32(scale * (dst + 0.5) - 0.5). Mirroring that matters for large images,
    # where a float32 ulp of the coordinate (~6e-5 near 1000) shows up in the weights.
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32).astype(np.float64)
    base = np.floor(src)
    t = src - base
    # Keys kernel at distances 1 + t, t, 1 - t, 2 - t
    w = np.stack([
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ], axis=1)
    idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return idx, w.astype(np.float32)


def bicubic_resize(image: np.ndarray, size) -> np.ndarray:
    """Resize float ``[H, W, C]`` to ``size = (h, w)`` as ``F.interpolate(mode="bicubic", align_corners=False)``
    (no antialias, no clamping of the overshoot, as the official code). Separable 4-tap gathers on the host, so a
    12-megapixel photo costs ~10^8 flops. Returns float32."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError(f"bicubic_resize: expected [H, W, C], got shape {img.shape}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"bicubic_resize: target size must be positive, got {size}")
    ih, wh = _cubic_taps(img.shape[0], h)
    iw, ww = _cubic_taps(img.shape[1], w)
    cols = img[:, iw]                                           # [H, w, 4, C]
    rows = np.einsum("hwkc,wk->hwc", cols, ww)                  # along W
    out = np.einsum("owkc,ok->owc", rows[ih].transpose(0, 2, 1, 3), wh)  # along H: [h, 4, w, C] -> [h, w, C]
    return out.astype(np.float32)


def preprocess_image(image, max_area) -> np.ndarray:
    """Image (path, PIL or uint8 ``[H, W, 3]``) to the official I2V input: float32 ``[h, w, 3]`` in ~[-1, 1],
    bicubic-resized to `i2v_size` for ``max_area`` (``"480p"``, ``"720p"``, ``"WxH"`` or an int)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    x = image_to_array(image)
    return bicubic_resize(x, i2v_size(x.shape[:2], max_area))


def i2v_video(image: np.ndarray, num_frames: int) -> np.ndarray:
    """VAE input ``[F, h, w, 3]``: the image as frame 0 followed by ``F - 1`` black (zero) frames."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"i2v_video: expected image [h, w, 3], got shape {img.shape}")
    f = check_num_frames(num_frames)
    video = np.zeros((f,) + img.shape, dtype=np.float32)
    video[0] = img
    return video


def i2v_mask(num_frames: int, lat_h: int, lat_w: int, dtype=np.float32) -> np.ndarray:
    """The 4-channel conditioning mask, channels-last ``[F_lat, lat_h, lat_w, 4]``.

    Official construction: a per-frame mask (1 for frame 0, else 0) whose first frame is repeated 4 times, grouped in
    fours: channel ``c`` of latent frame ``f`` is pixel frame ``4 f + c - 3`` (frame 0 for ``f = 0``). So latent frame
    0 is all ones and the others are zero.
    """
    f = check_num_frames(num_frames)
    frame_flags = np.zeros((f,), dtype=np.float32)
    frame_flags[0] = 1.0
    expanded = np.concatenate([np.repeat(frame_flags[:1], VAE_STRIDE[0]), frame_flags[1:]])
    per_latent = expanded.reshape(-1, VAE_STRIDE[0])            # [F_lat, 4]
    mask = np.broadcast_to(per_latent[:, None, None, :], (per_latent.shape[0], int(lat_h), int(lat_w), 4))
    return np.ascontiguousarray(mask, dtype=dtype)


def concat_condition(mask, image_latent):
    """``y = concat([mask (4), image latent (16)], axis=-1)``: the 20 channels that follow the 16 noise channels.

    Works on numpy or jax arrays ``[..., F_lat, lat_h, lat_w, C]``; a leading batch axis of the latent is matched by
    broadcasting the mask.
    """
    if mask.shape[-1] != 4:
        raise ValueError(f"concat_condition: mask must have 4 channels (last axis), got shape {mask.shape}")
    if image_latent.shape[-4:-1] != mask.shape[-4:-1]:
        raise ValueError(f"concat_condition: mask {mask.shape} and latent {image_latent.shape} disagree on "
                         "[F_lat, lat_h, lat_w]")
    if isinstance(mask, np.ndarray) and isinstance(image_latent, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp
    mask = xp.broadcast_to(mask.astype(image_latent.dtype), image_latent.shape[:-1] + (4,))
    return xp.concatenate([mask, image_latent], axis=-1)
