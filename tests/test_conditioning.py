"""I2V conditioning: size rule, image preprocessing + torch bicubic, mask layout, prompt cleaning."""

import hashlib

import numpy as np
import pytest

from wanjax.conditioning import (
    NEGATIVE_PROMPT,
    bicubic_resize,
    check_num_frames,
    concat_condition,
    i2v_mask,
    i2v_size,
    i2v_video,
    image_to_array,
    load_image,
    max_area_from_size,
    num_latent_frames,
    preprocess_image,
)
from wanjax.text import _WHITESPACE
from wanjax.text import clean_prompt as prompt_clean


def _official_size(h0, w0, max_area):
    """The formula of `image2video.py` (vae_stride 8, patch 2)."""
    aspect_ratio = h0 / w0
    lat_h = round(np.sqrt(max_area * aspect_ratio) // 8 // 2 * 2)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // 8 // 2 * 2)
    return lat_h * 8, lat_w * 8


@pytest.mark.parametrize(
    "hw,size,expected",
    [
        ((720, 1280), "480p", (464, 832)),  # 16:9 landscape at 480p
        ((1280, 720), "480p", (832, 464)),  # portrait
        ((512, 512), "480p", (624, 624)),  # square
        ((720, 1280), "720p", (720, 1280)),  # exact 16:9 at 720p
        ((480, 832), "480p", (464, 832)),  # sqrt(399360 * 480/832) = 479.99999999999994 -> floors to 464 (official)
        ((3000, 4000), "720p", (816, 1104)),  # 4:3 photo
    ],
)
def test_i2v_size_known_values(hw, size, expected):
    assert i2v_size(hw, size) == expected


@pytest.mark.parametrize(
    "hw", [(720, 1280), (1280, 720), (512, 512), (3000, 4000), (333, 1000), (1000, 217), (1079, 1921), (17, 23)]
)
@pytest.mark.parametrize("area", ["480p", "720p", 480 * 832, "1280x720", "832*480"])
def test_i2v_size_matches_official_formula(hw, area):
    max_area = max_area_from_size(area)
    h, w = i2v_size(hw, area)
    assert (h, w) == _official_size(hw[0], hw[1], max_area)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= max_area
    # aspect ratio kept up to rounding down to multiples of 16
    assert abs(np.log((h / w) / (hw[0] / hw[1]))) < np.log((h + 16) / h) + np.log((w + 16) / w)


def test_size_specs_and_errors():
    assert max_area_from_size("480p") == 480 * 832 and max_area_from_size("720P") == 720 * 1280
    assert max_area_from_size("832x480") == max_area_from_size((480, 832)) == 399360
    for bad in ("1080i", "x480", 3.5, "8x8"):
        with pytest.raises(ValueError, match="size"):
            max_area_from_size(bad)
    with pytest.raises(ValueError, match="aspect ratio"):
        i2v_size((1, 5000), "480p")


def test_frames_rule():
    assert check_num_frames(81) == 81 and num_latent_frames(81) == 21 and num_latent_frames(1) == 1
    for bad in (80, 0, 82, 6.5):
        with pytest.raises(ValueError, match="4n\\+1"):
            check_num_frames(bad)


def test_image_to_array_matches_to_tensor():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    ref = (torch.from_numpy(u8).permute(2, 0, 1).float().div(255).sub_(0.5).div_(0.5)).permute(1, 2, 0).numpy()
    got = image_to_array(u8)
    assert got.dtype == np.float32 and got.min() >= -1 and got.max() <= 1
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="RGB"):
        image_to_array(u8[..., :2])
    with pytest.raises(ValueError, match="uint8"):
        image_to_array(u8.astype(np.float32))


@pytest.mark.parametrize(
    "src,dst",
    [
        ((37, 53), (16, 32)),
        ((10, 12), (32, 48)),
        ((20, 20), (20, 20)),
        ((33, 17), (48, 16)),
        ((100, 80), (7, 5)),
        ((720, 1280), (464, 832)),
    ],
)
def test_bicubic_matches_torch_interpolate(src, dst):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(sum(src) + sum(dst))
    img = rng.uniform(-1, 1, src + (3,)).astype(np.float32)
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(img).permute(2, 0, 1)[None], size=dst, mode="bicubic", align_corners=False, antialias=False
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    got = bicubic_resize(img, dst)
    assert got.shape == dst + (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)


def test_preprocess_image_from_file(tmp_path):
    torch = pytest.importorskip("torch")
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(u8).save(path)
    got = preprocess_image(str(path), 64 * 112)
    h, w = _official_size(90, 160, 64 * 112)
    assert got.shape == (h, w, 3)
    x = torch.from_numpy(u8).permute(2, 0, 1).float().div(255).sub_(0.5).div_(0.5)
    ref = torch.nn.functional.interpolate(x[None], size=(h, w), mode="bicubic")[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(preprocess_image(Image.fromarray(u8), 64 * 112), got)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "bad.png")


def test_i2v_video_layout():
    img = np.random.default_rng(2).uniform(-1, 1, (16, 32, 3)).astype(np.float32)
    v = i2v_video(img, 9)
    assert v.shape == (9, 16, 32, 3)
    np.testing.assert_array_equal(v[0], img)
    assert not np.any(v[1:])


@pytest.mark.parametrize("frames", [1, 5, 9, 81])
def test_mask_matches_official_construction(frames):
    torch = pytest.importorskip("torch")
    lat_h, lat_w = 3, 5
    # image2video.py, verbatim semantics: [4, F_lat, lat_h, lat_w]
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]
    ref = msk.permute(1, 2, 3, 0).numpy()  # channels-last [F_lat, lat_h, lat_w, 4]
    got = i2v_mask(frames, lat_h, lat_w)
    assert got.shape == ((frames - 1) // 4 + 1, lat_h, lat_w, 4) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    assert np.all(got[0] == 1) and not np.any(got[1:])


def test_concat_condition():
    import jax.numpy as jnp

    mask = i2v_mask(9, 2, 3)
    lat = np.random.default_rng(3).standard_normal((3, 2, 3, 16)).astype(np.float32)
    y = concat_condition(mask, lat)
    assert y.shape == (3, 2, 3, 20)
    np.testing.assert_array_equal(y[..., :4], mask)
    np.testing.assert_array_equal(y[..., 4:], lat)
    yb = concat_condition(mask, jnp.asarray(lat)[None])  # batched jax latent
    assert yb.shape == (1, 3, 2, 3, 20)
    np.testing.assert_array_equal(np.asarray(yb[0]), y)
    with pytest.raises(ValueError, match="disagree"):
        concat_condition(mask, lat[:2])


def test_negative_prompt_is_official():
    assert NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清，字幕")
    assert NEGATIVE_PROMPT.endswith("三条腿，背景人很多，倒着走")
    assert len(NEGATIVE_PROMPT) == 137
    # sha256 of `sample_neg_prompt` in Wan-Video/Wan2.2 wan/configs/shared_config.py (commit 42bf4cf)
    assert hashlib.sha256(NEGATIVE_PROMPT.encode()).hexdigest() == (
        "ce96e0324e4b54ce4b6e867f669ca520952e1a34cc116543516b1897f0d3c47e"
    )
    assert "\n" not in NEGATIVE_PROMPT and " " not in NEGATIVE_PROMPT


def test_prompt_clean():
    assert prompt_clean("  a &amp;amp; b\n\t c \u3000 d  ") == "a & b c d"
    assert prompt_clean("x&lt;y") == "x<y"
    # U+001C..U+001F are not whitespace for the `regex` module the reference uses (ftfy, when installed, drops them)
    assert _WHITESPACE.sub(" ", "keep\x1cseparators") == "keep\x1cseparators"
    with pytest.raises(TypeError):
        prompt_clean(None)


def test_prompt_clean_whitespace_equals_regex_module():
    regex = pytest.importorskip("regex")
    chars = [chr(c) for c in range(0x3100) if chr(c).isspace() or regex.match(r"\s", chr(c))]
    text = "a" + "b".join(c + c for c in chars) + "z"
    ref = regex.sub(r"\s+", " ", text).strip()
    assert _WHITESPACE.sub(" ", text).strip() == ref
