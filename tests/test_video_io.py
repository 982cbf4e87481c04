"""wanjax.video_io helpers for notebooks: side_by_side, gif_bytes, video_html."""

import base64
import io
import re

import numpy as np
import pytest

from wanjax.video_io import gif_bytes, side_by_side, to_uint8, video_html


def _video(seed, f=5, h=16, w=12):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


def test_side_by_side_layout_and_float_input():
    a, b = _video(0), _video(1, w=7)
    c = np.zeros((5, 16, 3, 3), np.float32)  # float in [-1, 1]: 0 -> 128
    out = side_by_side([a, b, c], gap=2)
    assert out.dtype == np.uint8 and out.shape == (5, 16, 12 + 2 + 7 + 2 + 3, 3)
    np.testing.assert_array_equal(out[:, :, :12], a)
    assert (out[:, :, 12:14] == 255).all()
    np.testing.assert_array_equal(out[:, :, 14:21], b)
    np.testing.assert_array_equal(out[:, :, 23:], to_uint8(c))
    with pytest.raises(ValueError, match="same F and H"):
        side_by_side([a, _video(2, f=4)])
    with pytest.raises(ValueError, match="no videos"):
        side_by_side([])


def test_gif_bytes_round_trip():
    import imageio.v2 as imageio
    from PIL import Image

    v = np.zeros((4, 8, 10, 3), np.uint8)
    v[1, :, :, 0] = 255  # few colours: the GIF palette is exact
    v[2, :4] = 128
    v[3] = 255
    data = gif_bytes(v, fps=10)
    assert data[:6] == b"GIF89a"
    frames = imageio.mimread(io.BytesIO(data))
    assert len(frames) == 4
    np.testing.assert_array_equal(np.stack([f[..., :3] for f in frames]), v)
    im = Image.open(io.BytesIO(data))
    assert im.info.get("loop") == 0 and im.info.get("duration") == 100
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        gif_bytes(np.zeros((4, 8, 10), np.uint8))


def test_video_html_embeds_the_gif():
    v = _video(3)
    html = video_html(v, fps=8, scale=3, caption="BF16 <vs> W4A4")
    m = re.search(r'src="data:image/gif;base64,([^"]+)" width="(\d+)"', html)
    assert m and int(m.group(2)) == 3 * 12
    assert base64.b64decode(m.group(1)) == gif_bytes(v, fps=8)
    assert "<figcaption>BF16 &lt;vs&gt; W4A4</figcaption>" in html
    assert "figcaption" not in video_html(v)
