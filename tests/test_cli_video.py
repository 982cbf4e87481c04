"""Video output of `wanjax generate`: mp4 / GIF written atomically and verified before "wrote" is printed, no
``os.fork()`` warning from JAX, a failing or truncating writer -> exit 2 with nothing left at ``--out``. The model
is a stand-in (`_FakePipe`): these tests are about the output path, in seconds."""

import os
import subprocess
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import generate_argv

from wanjax import cli, video_io
from wanjax.cli import main


def _video(f=5, h=32, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (f, h, w, 3), dtype=np.uint8)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the control's own, outside the blocks below
def test_mp4_write_has_no_fork_warning_and_round_trips(tmp_path):
    jnp.ones(8).block_until_ready()  # JAX's threads are up
    # the control: imageio-ffmpeg's way of starting ffmpeg (preexec_fn=os.setpgrp) runs the fork hooks
    with pytest.warns(RuntimeWarning, match=r"os\.fork\(\) was called"):
        subprocess.run([video_io._ffmpeg_exe(), "-version"], capture_output=True, preexec_fn=os.setpgrp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = video_io.save_mp4(_video(), tmp_path / "a.mp4", fps=8)
    assert not [w for w in caught if "fork" in str(w.message)], [str(w.message) for w in caught]
    assert video_io.count_mp4_frames(path) == 5
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())
    import imageio.v2 as imageio

    frames = np.stack(imageio.mimread(path))
    assert frames.shape == (5, 32, 48, 3)


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_gif_and_odd_sizes_and_bad_fps(tmp_path):
    v = _video(h=15, w=17)
    assert video_io.count_mp4_frames(video_io.save_mp4(v, tmp_path / "odd.mp4", fps=4)) == 5
    video_io.save_gif(np.zeros((6, 8, 8, 3), np.uint8), tmp_path / "still.gif", fps=10)  # identical frames merge
    video_io.check_gif(tmp_path / "still.gif", 6, 10)
    with pytest.raises(
        video_io.VideoWriteError, match=r"expected a GIF of 1200 ms \(12 frames at 10 fps\), got 600 ms"
    ):
        video_io.check_gif(tmp_path / "still.gif", 12, 10)
    for fps in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="fps: expected a positive integer"):
            video_io.save_mp4(v, tmp_path / "x.mp4", fps=fps)
    with pytest.raises(ValueError, match=r"ending in \.mp4 or \.gif, got '\.avi'"):
        video_io.save_video(v, tmp_path / "x.avi")
    assert sorted(os.listdir(tmp_path)) == ["odd.mp4", "still.gif"]


def test_truncated_mp4_is_detected(tmp_path):
    path = video_io.save_mp4(_video(), tmp_path / "a.mp4")
    data = open(path, "rb").read()
    with open(tmp_path / "cut.mp4", "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(video_io.VideoWriteError, match="truncated or corrupt|incomplete MP4"):
        video_io.check_mp4(tmp_path / "cut.mp4", 5)
    with pytest.raises(video_io.VideoWriteError, match="expected 7 frames in the written video, got 5"):
        video_io.check_mp4(path, 7)


class _FakePipe:
    """Stands in for `WanI2VPipeline` in `wanjax generate`: the stages' shapes, no model."""

    def encode_text(self, prompts):
        return jnp.zeros((2, 4, 8))

    def prepare_condition(self, image, num_frames, max_area):
        return jnp.zeros((1, (num_frames - 1) // 4 + 1, 2, 2, 20)), (32, 32)

    def denoise(self, y, context, gen, progress=True, cache=None):
        return jnp.zeros(y.shape[:-1] + (16,)), ["high"] * gen.steps

    def decode(self, latents):
        f = (latents.shape[1] - 1) * 4 + 1
        return jnp.asarray(np.linspace(-1, 1, f * 32 * 32 * 3, dtype=np.float32).reshape(f, 32, 32, 3))


@pytest.fixture
def fake(monkeypatch, tmp_path):
    from PIL import Image

    monkeypatch.setattr(cli, "_open_pipeline", lambda *a, **kw: _FakePipe())
    monkeypatch.setenv("WANJAX_COMPILE_CACHE", "0")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "img.png")
    return generate_argv(tmp_path / "img.png", "--frames", "5", "--steps", "2", "--no-progress")


def test_generate_writes_a_checked_video_and_pngs(fake, tmp_path, capsys):
    out = tmp_path / "sub" / "v.mp4"  # the parent is created
    assert main(fake + ["--out", str(out), "--png-dir", str(tmp_path / "png"), "--fps", "8"]) == 0
    text = capsys.readouterr().out
    for stage in (
        "encoding the prompt (text encoder)",
        "encoding the image (VAE)",
        "denoising: 2 steps",
        "decoding (VAE)",
        f"wrote {out}: 5 frames 32x32 at 8 fps",
    ):
        assert stage in text
    assert video_io.count_mp4_frames(out) == 5 and len(os.listdir(tmp_path / "png")) == 5
    assert main(fake + ["--out", str(tmp_path / "v.gif")]) == 0
    video_io.check_gif(tmp_path / "v.gif", 5, 16)  # fps from models/mini: 16
    assert main(fake + ["--out", str(out)]) == 2  # exists: refused, untouched
    assert main(fake + ["--out", str(out), "--overwrite", "--fps", "4"]) == 0


@pytest.mark.parametrize("failure", ["raises", "truncates", "interrupted"])
def test_a_failing_writer_is_never_reported_as_success(fake, tmp_path, capsys, monkeypatch, failure):
    real = video_io._write_mp4_file

    def broken(frames, path, fps):
        if failure == "raises":
            raise OSError(28, "No space left on device", path)
        real(frames, path, fps)
        if failure == "interrupted":
            raise KeyboardInterrupt
        with open(path, "r+b") as f:  # the moov atom lost, as on a full disk
            f.truncate(os.path.getsize(path) - 200)

    monkeypatch.setattr(video_io, "_write_mp4_file", broken)
    out = tmp_path / "v.mp4"
    rc = main(fake + ["--out", str(out)])
    captured = capsys.readouterr()
    assert rc == (130 if failure == "interrupted" else 2)
    assert "wrote" not in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wanjax generate: ")
    if failure == "raises":
        assert "No space left on device" in err[0]
    if failure == "truncates":
        assert "VideoWriteError" in err[0] and "truncated or corrupt" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["img.png"]  # nothing at --out, no temporary file left
