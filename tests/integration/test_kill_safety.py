"""Kill safety: SIGKILL the trainer at named points of a checkpoint save; resuming always finds the
last complete checkpoint and continues exactly like an uninterrupted run.

The trainer runs through `paused_save.py`, which stops the save at the point (see its ``AFTER``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import tiny_overrides

from deepsuite.config import load_config
from deepsuite.training.trainer import TrainResult, train

ROOT = Path(__file__).resolve().parents[2]

# point in the save of step 4 -> the checkpoint a resume must pick up
POINTS = {
    "tmp_created": 2,  # tmp-step_4/ exists, empty
    "engine_saved": 2,  # DeepSpeed files written, no state.json
    "state_written": 2,  # complete but not renamed
    "renamed": 2,  # step_4/ complete, `latest` still names step_2 (both are complete)
    "latest_updated": 4,  # `latest` names step_4, rotation not yet done
}


@pytest.fixture(scope="module")
def reference(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return train(load_config(None, tiny_overrides(tiny_data, tmp_path_factory.mktemp("ref"))))


def kill_at(point: str, argv: list[str], timeout: float = 240.0) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)  # set by this process's own world of one: the child makes its own
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("paused_save.py")), f"{point}@4", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    paused = threading.Event()
    lines: list[str] = []

    def watch() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if line.startswith(f"DEEPSUITE_TEST_PAUSED {point}@4"):
                paused.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    try:
        waited = 0.0
        while not paused.wait(0.5):
            waited += 0.5
            assert proc.poll() is None and waited < timeout, (
                f"trainer never reached {point} (exit {proc.poll()}):\n" + "".join(lines[-20:])
            )
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_during_save_then_resume(
    point: str, reference: TrainResult, tiny_data: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(tiny_data, tmp_path, training__sample_tokens=0)
    kill_at(point, ["train", *overrides])
    latest = (tmp_path / "latest").read_text().strip()
    assert latest == f"step_{POINTS[point]}"
    if point in ("tmp_created", "engine_saved", "state_written"):
        assert (tmp_path / "tmp-step_4").is_dir() and not (tmp_path / "step_4").exists()

    resumed = train(load_config(None, overrides))
    assert resumed.start_step == POINTS[point]
    assert resumed.end_step == 6
    assert resumed.losses == reference.losses[POINTS[point] :]
    assert (tmp_path / "latest").read_text().strip() == "step_6"
    assert not list(tmp_path.glob("tmp-*"))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_4", "step_6"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # records of the killed run after its checkpoint were dropped
