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
    "NEGATIVE_PROMPT",
    "SIZE_PRESETS",
    "VAE_STRIDE",
    "PATCH_SIZE",
    "max_area_from_size",
    "i2v_size",
    "check_num_frames",
    "num_latent_frames",
    "ALPHA_BACKGROUND",
    "load_image",
    "image_to_array",
    "bicubic_resize",
    "preprocess_image",
    "i2v_video",
    "i2v_mask",
    "concat_condition",
]

# Official `sample_neg_prompt` (wan/configs/shared_config.py), used when the negative prompt is empty.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# Maximum pixel areas of the official sizes (MAX_AREA_CONFIGS); the aspect ratio comes from the image.
SIZE_PRESETS = {"480p": 480 * 832, "720p": 720 * 1280}
VAE_STRIDE = (4, 8, 8)  # (t, h, w)
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
        raise ValueError(
            f"i2v_size: image {w0}x{h0} (WxH) has an aspect ratio too extreme for max area {max_area}: "
            f"got latent {lat_w}x{lat_h}"
        )
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


#: Background that transparent pixels are composited over (alpha images): white, as a viewer shows them.
ALPHA_BACKGROUND = (255, 255, 255)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _describe(name) -> str:
    return f"image {name}" if name else "image"


def _composite(rgba: np.ndarray, background) -> np.ndarray:
    """uint8 [H, W, 4] (straight alpha) over an RGB ``background`` -> uint8 [H, W, 3]."""
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32).reshape(1, 1, 3)
    out = rgba[..., :3].astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=-1)


def _pil_to_rgb(im, name=None, background=ALPHA_BACKGROUND) -> np.ndarray:
    """Any PIL image -> uint8 RGB ``[H, W, 3]`` with the values meant (see `load_image`)."""
    mode = im.mode
    what = _describe(name)
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(im)
        if mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
            raise ValueError(
                f"{what}: mode 'I' (32-bit integer) with values in [{int(a.min())}, {int(a.max())}]; "
                "expected 16-bit values in [0, 65535] (or save it as 8-bit RGB / grayscale)"
            )
        g = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
        return _gray_to_rgb(g)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.all(np.isfinite(a)) or (a.size and (a.min() < 0.0 or a.max() > 1.0)):
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if np.any(np.isfinite(a)) else (np.nan, np.nan)
            raise ValueError(
                f"{what}: mode 'F' (32-bit float) with values in [{lo:g}, {hi:g}]"
                f"{' and NaN/Inf' if not np.all(np.isfinite(a)) else ''}; expected finite values in "
                "[0, 1] (or save it as 8-bit RGB / grayscale)"
            )
        return _gray_to_rgb(np.rint(a * 255.0).astype(np.uint8))
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info)
    if has_alpha:
        if mode == "La":  # premultiplied L + alpha: Pillow converts only via LA
            im = im.convert("LA")
        try:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        except (ValueError, OSError) as e:
            raise ValueError(f"{what}: cannot convert mode {mode!r} with transparency to RGB: {e}") from e
        return _composite(rgba, background)
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX
    except (ValueError, OSError) as e:
        raise ValueError(
            f"{what}: mode {mode!r} cannot be converted to RGB ({e}); expected an RGB, grayscale, "
            "palette, CMYK or 16-bit grayscale image"
        ) from e


def load_image(path, background=ALPHA_BACKGROUND) -> np.ndarray:
    """Read an image file as uint8 RGB ``[H, W, 3]``, whatever mode Pillow reads it in.

    8-bit RGB, grayscale (``L``), 1-bit, palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's
    ``convert("RGB")`` (as the official ``generate.py``). 16-bit grayscale (``I;16*``; ``I`` with values in
    [0, 65535]): scaled to 8 bits (``round(v / 257)``, so mid grey stays mid grey; Pillow's own conversion clips
    to white). 32-bit float (``F``): values in [0, 1] scaled by 255, anything else refused. Transparency
    (``RGBA``, ``LA``, ``PA``, a palette or grey with a transparent colour): composited over ``background``
    (white by default, `ALPHA_BACKGROUND`; the official code drops the alpha channel, which shows the colour stored
    under transparent pixels, often black). Animated files: the first frame. EXIF orientation is not applied (as
    the official code). A missing file raises ``FileNotFoundError``; an unreadable one or an unsupported mode
    ``ValueError`` naming the file and mode.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}" + (" (a directory)" if os.path.isdir(path) else ""))
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a core dependency
        raise ImportError("reading images needs Pillow (a core dependency of wanjax): pip install pillow") from e
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # PIL raises several types for bad files
        raise ValueError(f"cannot read image {path}: {e}") from e
    with im:
        return _pil_to_rgb(im, path, background)


def image_to_array(image, background=ALPHA_BACKGROUND) -> np.ndarray:
    """An image to float32 ``[H, W, 3]`` in [-1, 1] (``to_tensor``, -0.5, /0.5).

    ``image``: a PIL image in any mode (converted as `load_image`), or an array: uint8 or uint16 (scaled by
    1/257), ``[H, W]`` grayscale, ``[H, W, 1]``, ``[H, W, 3]`` RGB or ``[H, W, 4]`` RGBA (composited over
    ``background``). Other shapes and dtypes (e.g. float arrays, whose range is ambiguous) raise ``ValueError``.
    """
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL.Image
        arr = _pil_to_rgb(image, getattr(image, "filename", None) or None, background)
    else:
        arr = np.asarray(image)
        if arr.dtype == np.uint16:
            arr = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
        if arr.dtype != np.uint8:
            raise ValueError(f"image: expected dtype uint8 (0..255) or uint16, got {arr.dtype} (shape {arr.shape})")
        if arr.ndim == 2:
            arr = _gray_to_rgb(arr)
        elif arr.ndim == 3 and arr.shape[-1] == 1:
            arr = _gray_to_rgb(arr[..., 0])
        elif arr.ndim == 3 and arr.shape[-1] == 4:
            arr = _composite(arr, background)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(
            f"image: expected an RGB image [H, W, 3] (or grayscale [H, W] / [H, W, 1], RGBA "
            f"[H, W, 4]), got shape {arr.shape}"
        )
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
    w = np.stack(
        [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        ],
        axis=1,
    )
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
    cols = img[:, iw]  # [H, w, 4, C]
    rows = np.einsum("hwkc,wk->hwc", cols, ww)  # along W
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
    per_latent = expanded.reshape(-1, VAE_STRIDE[0])  # [F_lat, 4]
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
        raise ValueError(
            f"concat_condition: mask {mask.shape} and latent {image_latent.shape} disagree on [F_lat, lat_h, lat_w]"
        )
    if isinstance(mask, np.ndarray) and isinstance(image_latent, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp
    mask = xp.broadcast_to(mask.astype(image_latent.dtype), image_latent.shape[:-1] + (4,))
    return xp.concatenate([mask, image_latent], axis=-1)
