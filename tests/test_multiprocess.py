"""Two processes on localhost, one global 8-device mesh (``jax.distributed``, CPU collectives).

Both run ``tests/sharded/multiprocess_worker.py`` (4 simulated CPU devices
each): sharded init, data-parallel steps, orbax save and restore onto another
mesh shape, and ``export_peft`` from gathered arrays. The workers check their
results against a single-device run; this test then compares the PEFT file
written from the sharded, 2-process adapters with the one written from the
single-device reference. Both processes are killed on failure or timeout.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from _xla_env import xla_env
from safetensors.numpy import load_file

WORKER = pathlib.Path(__file__).parent / "sharded" / "multiprocess_worker.py"
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # the worker's own session: it and nothing else
    for p in procs:
        p.wait(timeout=30)


def test_two_processes_train_save_restore_and_export_like_one(tmp_path):
    port = free_port()
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), str(i), str(port), str(tmp_path)],
                        env=xla_env(4),
                        cwd=WORKER.parent,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        _kill(procs)
    outputs = [f.read_text() for f in logs]
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{o[-5000:]}"
        for i, (p, o) in enumerate(zip(procs, outputs, strict=True))
    )
    assert all(p.returncode == 0 for p in procs), f"a worker failed or exceeded {TIMEOUT_S} s:\n{report}"
    for i, out in enumerate(outputs):
        for check in ("init sharded", "data-parallel step", "orbax save", "export_peft"):
            assert f"[process {i}] OK {check}" in out, report

    sharded, reference = tmp_path / "peft_sharded", tmp_path / "peft_reference"
    config = json.loads((sharded / "adapter_config.json").read_text())
    assert config == json.loads((reference / "adapter_config.json").read_text())
    got, want = load_file(sharded / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and len(got) == 24  # 2 layers x 6 kernels x (A, B)
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "a temporary export directory was left"
