"""Input images in every mode Pillow reads: converted to the values meant, or refused naming file and mode."""

import numpy as np
import pytest

from wanjax.conditioning import ALPHA_BACKGROUND, image_to_array, load_image

Image = pytest.importorskip("PIL.Image")


def _save(tmp_path, im, name, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_16bit_png_mid_grey_reads_as_mid_grey(tmp_path):
    """A 16-bit grayscale PNG of mid grey (32768) is mid grey (128), not white as Pillow's convert('RGB') gives."""
    im = Image.fromarray(np.full((6, 5), 32768, np.uint16))
    path = _save(tmp_path, im, "grey16.png")
    with Image.open(path) as back:
        assert back.mode.startswith("I;16")
    got = load_image(path)
    assert got.shape == (6, 5, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, 128)
    ramp = np.array([[0, 257, 65535, 32767]], np.uint16)
    np.testing.assert_array_equal(
        load_image(_save(tmp_path, Image.fromarray(ramp), "ramp16.png"))[..., 0], [[0, 1, 255, 127]]
    )


def test_16bit_big_endian_tiff_and_mode_I(tmp_path):
    a = np.full((4, 4), 32768, np.uint16)
    im = Image.frombytes("I;16B", (4, 4), a.astype(">u2").tobytes())
    path = _save(tmp_path, im, "g16b.tif")
    with Image.open(path) as back:
        assert back.mode == "I;16B"
    np.testing.assert_array_equal(load_image(path), 128)
    np.testing.assert_array_equal(image_to_array(Image.new("I", (4, 4), 65535)), 1.0)
    np.testing.assert_array_equal(load_image(_save(tmp_path, Image.new("I", (4, 4), 32768), "i32.tif")), 128)
    with pytest.raises(ValueError, match=r"mode 'I'.*\[0, 65535\]"):
        image_to_array(Image.new("I", (4, 4), 70000))
    with pytest.raises(ValueError, match=r"mode 'I'.*-5"):
        image_to_array(Image.new("I", (4, 4), -5))


def test_float_mode_F(tmp_path):
    im = Image.fromarray(np.full((3, 3), 0.5, np.float32))
    assert im.mode == "F"
    np.testing.assert_array_equal(load_image(_save(tmp_path, im, "f.tif")), 128)
    for bad in (2.0, -0.1, np.nan):
        with pytest.raises(ValueError, match=r"mode 'F'.*\[0, 1\]"):
            image_to_array(Image.fromarray(np.full((3, 3), bad, np.float32)))


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 2))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 = red, 1 = blue
    px = p.load()
    px[1, 0] = 1
    got = load_image(_save(tmp_path, p, "pal.png"))
    assert tuple(got[0, 0]) == (255, 0, 0) and tuple(got[0, 1]) == (0, 0, 255)
    path = _save(tmp_path, p, "pal_t.png", transparency=0)  # red is the transparent colour
    with Image.open(path) as back:
        assert back.mode == "P" and "transparency" in back.info
    got = load_image(path)
    assert tuple(got[0, 0]) == ALPHA_BACKGROUND and tuple(got[0, 1]) == (0, 0, 255)


def test_alpha_composited_over_the_background(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3] = 0, 255, 128  # transparent, opaque, half
    got = load_image(_save(tmp_path, Image.fromarray(rgba, "RGBA"), "a.png"))
    assert tuple(got[0, 0]) == (255, 255, 255)  # fully transparent -> white, not the stored colour
    assert tuple(got[0, 1]) == (200, 0, 0)
    assert tuple(got[0, 2]) == (round(200 * 128 / 255 + 255 * 127 / 255), 127, 127)
    black = load_image(tmp_path / "a.png", background=(0, 0, 0))
    assert tuple(black[0, 0]) == (0, 0, 0) and tuple(black[0, 1]) == (200, 0, 0)
    np.testing.assert_array_equal(image_to_array(rgba), image_to_array(got))  # RGBA arrays alike
    la = Image.fromarray(
        np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [255, 255]], np.uint8)], -1), "LA"
    )
    got = load_image(_save(tmp_path, la, "la.png"))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[0, 1]) == (50, 50, 50)
    pa = Image.new("PA", (2, 1))
    pa.putpalette([50, 50, 50] + [0] * 765)
    pa.putpixel((0, 0), (0, 0))  # transparent
    pa.putpixel((1, 0), (0, 255))
    got = image_to_array(pa)
    assert got[0, 0, 0] == 1.0 and abs(got[0, 1, 0] - (50 / 127.5 - 1)) < 1e-6


@pytest.mark.parametrize("mode", ["1", "L", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"])
def test_other_modes_convert_like_pillow(tmp_path, mode):
    rgb = Image.fromarray(np.array([[[255, 255, 255], [0, 0, 0]], [[128, 128, 128], [10, 200, 30]]], np.uint8))
    im = rgb.convert(mode)
    got = image_to_array(im)
    ref = np.asarray(im.convert("RGB"), np.float32) / 255 * 2 - 1
    np.testing.assert_array_equal(got, ref)
    assert got[0, 0].min() > 0.9 and got[0, 1].max() < -0.9  # white stays white, black stays black
    if mode in ("1", "L", "CMYK"):
        ext = {"1": "png", "L": "png", "CMYK": "jpg"}[mode]
        back = load_image(_save(tmp_path, im, f"x.{ext}"))
        assert back[0, 0].min() > 230 and back[0, 1].max() < 30  # CMYK goes through a lossy JPEG


def test_arrays_grey_uint16_and_refusals():
    g = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(image_to_array(g), image_to_array(np.repeat(g[..., None], 3, -1)))
    np.testing.assert_array_equal(image_to_array(g[..., None]), image_to_array(g))
    np.testing.assert_allclose(image_to_array(np.full((2, 2, 3), 32768, np.uint16)), 128 / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        image_to_array(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        image_to_array(np.zeros((2, 2, 2), np.uint8))


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="directory"):
        load_image(tmp_path)
