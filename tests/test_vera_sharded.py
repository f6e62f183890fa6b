"""VeRA on sharded params: the 8-device checks of ``tests/sharded/vera_checks.py``, in a subprocess.

``init_lora`` / ``init_lora_sharded`` on Megatron-sharded GPT params give each ``d``/``b`` its derived sharding
and the shared projections a replicated one, with the single-device values; a jitted factored step trains
sharded with the single-device losses (see the script's docstring).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from _xla_env import xla_env

SCRIPT = pathlib.Path(__file__).parent / "sharded" / "vera_checks.py"


def test_vera_adapters_are_born_sharded_and_train_sharded_like_one_device():
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=xla_env(8), capture_output=True, text=True, timeout=300,
                          cwd=SCRIPT.parent)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "PASSED vera" in out, out[-6000:]
