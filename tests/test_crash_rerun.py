"""tests/crash_rerun.py: a test whose xdist worker dies is run once more; a second crash still fails the run."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFTEST = """
from crash_rerun import CrashRerun


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(CrashRerun(), "wanjax-crash-rerun")
"""

TESTFILE = """
import os
import pathlib

MARK = pathlib.Path(__file__).with_name("crashed_once")


def test_ok():
    assert True


def test_crashes_once():
    if not MARK.exists():
        MARK.write_text("1")
        os.abort()


def test_crashes_always():
    os.abort()


def test_fails():
    assert 1 == 2
"""


def _run(tmp_path, *args):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_generated.py").write_text(textwrap.dedent(TESTFILE))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider", "-rA", *args, str(tmp_path)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_crashed_test_runs_again_and_a_second_crash_fails(tmp_path):
    r = _run(tmp_path)
    out = r.stdout
    assert r.returncode == 1, out  # test_fails and the twice-crashing test fail the run
    assert "PASSED test_generated.py::test_crashes_once" in out, out  # its second run, on a fresh worker
    assert "FAILED test_generated.py::test_crashes_always" in out, out
    assert "FAILED test_generated.py::test_fails" in out, out  # an assertion is never run again
    assert "worker crashes" in out and "test_crashes_once: worker crashed" in out, out
    assert "test_crashes_always: worker crashed 2 times; failed" in out, out
    assert "2 failed, 2 passed" in out and "2 rerun" in out, out  # one rerun each for the two crashing tests
