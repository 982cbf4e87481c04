"""Test-session set-up: CPU only, 8 host devices (for the sharding tests), fp32 matmuls on CPU.

JAX's persistent compilation cache stays off in tests (``WANJAX_COMPILE_CACHE=0``): reading XLA:CPU executables back
from it saved no measurable time here and has open crash reports upstream (jax-ml/jax#28908). A test whose xdist
worker dies hard (a signal, not a failed assertion) is run once more on a fresh worker (``crash_rerun.py``): the crash
stays in the summary, and a second crash fails the run."""

import os

import pytest
from crash_rerun import CrashRerun

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANJAX_COMPILE_CACHE", "0")  # tests calling wanjax.cli.main must not write ~/.cache
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


@pytest.fixture(autouse=True)
def _attention_backend_restored():
    """A test that attaches an artifact sets the recipe's attention backend process-wide (``apply_recipe_attention``;
    the default recipe asks for ``"auto8"``): restore the automatic selection after every test so no other test
    inherits it."""
    yield
    from wanjax.model import attention

    attention.set_attention_backend(None)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(CrashRerun(), "wanjax-crash-rerun")
