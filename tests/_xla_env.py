"""Environment for subprocesses that simulate several CPU devices."""

import os

# Compile-speed flags: the sharded and single-device runs are compiled the same way, so results still compare.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_env(devices: int) -> dict[str, str]:
    """``os.environ`` plus XLA flags for ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    env["JAX_PLATFORMS"] = "cpu"
    return env
