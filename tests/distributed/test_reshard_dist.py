"""Resume on another layout: a checkpoint written on one world size and ZeRO stage, resumed with plain
`checkpoint.resume` on another, continues exactly like an uninterrupted run on the new layout (its
fp32 masters, Adam moments and step, LR schedule, data position and router biases carried over):
the next losses within 1e-5 relative, the consolidated weights (router biases included) within
1e-5. The conversion is kept beside the checkpoint, written atomically, and reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_spawn import torchrun
from safetensors.torch import load_file

from deepsuite.checkpoint import reshard
from deepsuite.checkpoint.manager import verify_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, K = 6, 3


def _run(tmp_path: Path, run: str, case: str, nproc: int) -> dict:
    out = tmp_path / f"{run}-{case.replace(':', '_')}.json"
    return torchrun(
        "reshard.py", "--steps", str(STEPS), "--dir", str(tmp_path / run), "--cases", case,
        nproc=nproc, out_json=out, timeout=900,
    )  # fmt: skip


def _resharded(
    tmp_path: Path, run: str, model: str, source: tuple[int, int], target: tuple[int, int]
) -> dict:
    """Train K steps on ``source`` (ranks, stage), then resume on ``target`` (ranks, stage)."""
    first = _run(tmp_path, run, f"{model}:z{source[1]}:first{K}", nproc=source[0])
    assert (first["start"], first["end"]) == (0, K)
    resumed = _run(tmp_path, run, f"{model}:z{target[1]}:resume", nproc=target[0])
    assert (resumed["start"], resumed["end"]) == (K, STEPS)
    meta = json.loads((tmp_path / run / "ckpt" / f"step_{K}" / "universal" / "meta.json").read_text())
    assert (meta["step"], meta["source_world_size"], meta["source_zero_stage"]) == (K, *source)
    return resumed


def _assert_continues(tmp_path: Path, run: str, ref_run: str, resumed: dict, reference: dict) -> None:
    want = reference["losses"][K:]
    rel = max(abs(a - b) / abs(b) for a, b in zip(resumed["losses"], want, strict=True))
    assert rel < 1e-5, (run, rel, resumed["losses"], want)
    got = load_file(tmp_path / run / "weights.safetensors")
    ref = load_file(tmp_path / ref_run / "weights.safetensors")
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=name)


def test_two_ranks_zero2_resume_on_one_rank_zero0(tmp_path: Path) -> None:
    """DeepSeek-V3 (MoE, MTP, router biases) written by 2 ranks under ZeRO-2, resumed on 1 rank."""
    reference = _run(tmp_path, "full", "dsv3:z0:full", nproc=1)
    resumed = _resharded(tmp_path, "moved", "dsv3", source=(2, 2), target=(1, 0))
    _assert_continues(tmp_path, "moved", "full", resumed, reference)
    assert any("e_score_correction_bias" in k for k in load_file(tmp_path / "moved" / "weights.safetensors"))

    # the conversion is reused, and a killed conversion leaves no folder under the final name
    step = tmp_path / "moved" / "ckpt" / f"step_{K}"
    verify_checkpoint(step)  # the folder beside the checkpoint does not disturb its verification
    universal = step / "universal"
    stamp = {p.name: p.stat().st_mtime_ns for p in universal.iterdir()}
    assert reshard.ensure_universal(step) == universal
    assert {p.name: p.stat().st_mtime_ns for p in universal.iterdir()} == stamp

    target = tmp_path / "killed" / "universal"
    original = reshard.save_file
    calls = []

    def dying_save(tensors: dict, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill in the middle of the conversion
        original(tensors, path)

    reshard.save_file = dying_save  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            reshard.write_universal(step, target)
    finally:
        reshard.save_file = original  # type: ignore[assignment]
    assert not target.exists() and not list(target.parent.glob(".universal.tmp-*"))


def test_one_rank_zero0_and_two_ranks_zero1_resume_on_two_ranks_zero3(tmp_path: Path) -> None:
    """GPT with an untied LM head: 1 rank ZeRO-0 → 2 ranks ZeRO-3, 2 ranks ZeRO-1 → 2 ranks ZeRO-3."""
    reference = _run(tmp_path, "full", "gpt_untied:z3:full", nproc=2)
    from_one = _resharded(tmp_path, "from_z0", "gpt_untied", source=(1, 0), target=(2, 3))
    _assert_continues(tmp_path, "from_z0", "full", from_one, reference)
    from_z1 = _resharded(tmp_path, "from_z1", "gpt_untied", source=(2, 1), target=(2, 3))
    _assert_continues(tmp_path, "from_z1", "full", from_z1, reference)


def test_two_ranks_zero3_resume_on_one_rank_zero2(tmp_path: Path) -> None:
    """The ZeRO-3 source (its masters and moments in per-rank lists of sub-group partitions)."""
    reference = _run(tmp_path, "full", "gpt_tied:z2:full", nproc=1)
    resumed = _resharded(tmp_path, "from_z3", "gpt_tied", source=(2, 3), target=(1, 2))
    _assert_continues(tmp_path, "from_z3", "full", resumed, reference)
