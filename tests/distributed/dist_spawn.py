"""Helpers for tests that spawn ``torchrun --standalone`` on CPU ranks (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    """A TCP port that is free right now (for a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment for DeepSpeed on CPU with gloo, one thread per rank."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def torchrun(
    script: str, *args: str, nproc: int = 2, timeout: int = 300, out_json: Path | None = None
) -> dict:
    """Run ``tests/distributed/workers/<script>`` under torchrun; return the JSON rank 0 wrote.

    The worker asserts with ``torch.testing.assert_close`` itself; a failing rank makes the
    run fail, and the test shows its output.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKERS / script),
        *args,
    ]
    if out_json is not None:
        cmd += ["--out", str(out_json)]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"{script} failed with exit code {proc.returncode}:\n{tail}")
    if out_json is None:
        return {}
    return json.loads(out_json.read_text())
