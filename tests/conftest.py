"""Test-session set-up: CPU only, 8 host devices (for the sharding tests), fp32 matmuls on CPU."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANJAX_COMPILE_CACHE", "0")  # tests calling wanjax.cli.main must not write ~/.cache
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


@pytest.fixture(scope="session")
def _jax_compile_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_compile_cache")


@pytest.fixture(scope="module")
def jax_compile_cache(_jax_compile_cache_dir):
    """JAX's persistent compilation cache on while a module runs (``pytestmark = pytest.mark.usefixtures(
    "jax_compile_cache")``), in one directory of the session's temporary dir shared by the modules that use it: a
    program another pipeline of the same shapes already compiled (the VAE, the text encoder, ...) is read back instead
    of compiled again. The previous settings are restored after the module (the CLI tests check them)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(_jax_compile_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()
    yield _jax_compile_cache_dir
    for n, v in before.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def _attention_backend_restored():
    """A test that attaches an artifact sets the recipe's attention backend process-wide (``apply_recipe_attention``;
    the default recipe asks for ``"auto8"``): restore the automatic selection after every test so no other test
    inherits it."""
    yield
    from wanjax.model import attention

    attention.set_attention_backend(None)
