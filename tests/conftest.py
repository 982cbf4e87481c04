"""Test-session set-up: CPU only, 8 host devices (for the sharding tests), fp32 matmuls on CPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANJAX_COMPILE_CACHE", "0")  # tests calling wanjax.cli.main must not write ~/.cache
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
