"""The multi-rank trainer tests read the embedded corpus from `data/shakespeare` (the configs'
default `data.out_dir`); prepare it once per session when a fresh clone does not have it yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def prepared_shakespeare() -> Path:
    out = ROOT / "data" / "shakespeare"
    if not (out / "meta.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "deepsuite", "prepare-data", "--config", "configs/debug.yaml"],
            cwd=ROOT,
            check=True,
            timeout=600,
        )
    return out
