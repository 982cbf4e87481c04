"""bench/device_background.sh: a job started by one call outlives it, runs in a snapshot of the calling directory,
and a later `wait` reports its exit status and copies its files to $OUT."""

import os
import shutil
import subprocess
import time

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "device_background.sh")


def _bg(*args, cwd, env):
    return subprocess.run(["bash", SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid")
def test_start_outlives_its_call_and_wait_fetches_files(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "input.txt").write_text("x")
    env = {**os.environ, "BG_DIR": str(tmp_path / "bg"), "OUT": str(out)}
    job = "sleep 2; mkdir -p res; cat input.txt > res/a.json; echo finished; exit 3"
    r = _bg("start", "j", "bash", "-c", job, cwd=work, env=env)
    assert r.returncode == 0 and "[j] started" in r.stdout
    shutil.rmtree(work)  # a later call's copy replaces the directory the job was started from
    work.mkdir()
    r = _bg("wait", "j", "0", cwd=work, env=env)
    assert r.returncode == 3 and "[j] running" in r.stdout  # still running: exit 3
    time.sleep(0.2)
    r = _bg("wait", "j", "30", "res/*.json", cwd=work, env=env)
    assert r.returncode == 0 and "[j] done: rc=3" in r.stdout and "finished" in r.stdout
    assert (out / "a.json").read_text() == "x" and "finished" in (out / "j.log").read_text()
    r = _bg("start", "j", cwd=work, env=env)
    assert r.returncode == 2 and "no command" in r.stderr
    r = _bg("wait", "missing", "1", cwd=work, env=env)
    assert r.returncode == 3 and "not running and no exit status" in r.stdout
