"""launch/multinode.sh end to end on localhost: two torchrun "nodes" (one CPU rank each, gloo) train
and checkpoint; an elastic restart after SIGKILL of one rank resumes and matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from dist_spawn import ROOT, cpu_env, free_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Slow enough per step (~0.3 s on a busy CPU) that a kill lands between two checkpoints.
TRAIN_ARGS = [
    "training.steps=30",
    "checkpoint.every=10",
    "checkpoint.keep_last=3",
    "training.eval_every=1000",
    "training.sample_tokens=0",
    "training.seq_len=256",
    "model.d_model=256",
    "model.n_layers=4",
    "logging.progress=false",
]


def start_nodes(run: Path, max_restarts: int = 0, nnodes: int = 2) -> list[subprocess.Popen]:
    """``nnodes`` torchrun agents through launch/multinode.sh, 2 ranks in total."""
    port = free_port()
    procs = []
    for node in range(nnodes):
        env = cpu_env(
            NNODES=str(nnodes),
            NODE_RANK=str(node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            NGPU=str(2 // nnodes),
            RDZV_ID=f"test-{port}",
            MAX_RESTARTS=str(max_restarts),
            RDZV_TIMEOUT="120",
        )
        args = [f"checkpoint.dir={run / 'ckpt'}", f"logging.run_dir={run / 'log'}", *TRAIN_ARGS]
        log = open(run / f"node{node}.log", "w")  # noqa: SIM115 - closed when the process ends
        procs.append(
            subprocess.Popen(
                ["bash", str(ROOT / "launch" / "multinode.sh"), *args],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def wait(procs: list[subprocess.Popen], run: Path, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    try:
        for p in procs:
            rc = p.wait(timeout=max(1.0, deadline - time.time()))
            if rc != 0:
                logs = "\n".join(p.read_text()[-3000:] for p in sorted(run.glob("node*.log")))
                pytest.fail(f"a node exited with {rc}:\n{logs}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def losses(run: Path) -> dict[int, float]:
    """Step -> training loss (the last record wins: a restarted run logs the redone steps again)."""
    out: dict[int, float] = {}
    for line in (run / "log" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[int(rec["step"])] = float(rec["loss"])
    return out


def worker_pids(agent_pid: int) -> list[int]:
    """Children of a torchrun agent (the training processes)."""
    path = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    wait(start_nodes(run), run)
    return run


def test_two_nodes_train_and_checkpoint(uninterrupted: Path) -> None:
    ckpt = uninterrupted / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_30"
    for step in (10, 20, 30):
        state = json.loads((ckpt / f"step_{step}" / "state.json").read_text())
        assert state["step"] == step and state["world_size"] == 2
        assert (ckpt / f"step_{step}" / "rng" / "rank_00001.json").is_file()  # written by the second node
    trained = losses(uninterrupted)
    assert sorted(trained) == list(range(1, 31))
    assert trained[30] < trained[1] - 1.0


def test_elastic_restart_after_sigkill_matches_uninterrupted(tmp_path: Path, uninterrupted: Path) -> None:
    # Two agents ("nodes"), one rank each: the rank of node 1 is SIGKILLed between the checkpoints
    # of step 10 and step 20; torchrun restarts the job (MAX_RESTARTS=1), which resumes from step 10.
    run = tmp_path
    procs = start_nodes(run, max_restarts=1, nnodes=2)
    metrics, latest = run / "log" / "metrics.jsonl", run / "ckpt" / "latest"
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline:
        time.sleep(0.05)
        if not (latest.exists() and latest.read_text().strip() == "step_10" and metrics.exists()):
            continue
        if max(losses(run), default=0) >= 12:
            pids = worker_pids(procs[-1].pid)  # the last rank
            if pids:
                os.kill(pids[-1], signal.SIGKILL)  # one rank dies mid-run, between checkpoints
                killed = max(losses(run))
    assert killed is not None and killed < 20, "could not kill a rank between step 10 and step 20"
    wait(procs, run)
    log = (run / "node0.log").read_text()
    assert "step_10 at step 10" in log  # "resumed from …/step_10 at step 10": the last checkpoint
    resumed, ref = losses(run), losses(uninterrupted)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(21, 31):
        assert abs(resumed[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, resumed[step], ref[step])


def test_torchrun_sh_dry_run_validates_the_layout_on_every_rank(tmp_path: Path) -> None:
    env = cpu_env(NGPU="2", CONFIG="configs/debug.yaml", MASTER_PORT=str(free_port()))
    # called from another folder: the checkout's CONFIG is found, relative paths stay the caller's
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), "--dry-run", "parallel.zero_stage=2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "world: 2 rank(s)" in out.stdout and "stage: 2" in out.stdout
    bad = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), "--dry-run", "parallel.ep_size=3"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "parallel.ep_size=3" in bad.stdout + bad.stderr


def test_slurm_sbatch_runs_one_multinode_agent_per_node(tmp_path: Path) -> None:
    """slurm.sbatch with stub `scontrol`/`srun` (one local task per "node"): a 2-node dry run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "127.0.0.1\\nnode-b\\n"\n')
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        'while [[ "$1" == --* ]]; do shift; done\n'
        "pids=()\n"
        'for id in 0 1; do SLURM_NODEID=$id "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = cpu_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_NNODES="2",
        SLURM_JOB_ID=f"job{free_port()}",
        SLURM_SUBMIT_DIR=str(ROOT),
        NGPU="1",
        MASTER_PORT=str(free_port()),
    )
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), "--dry-run"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 nodes x 1 GPUs, rendezvous 127.0.0.1:" in out.stdout
    assert "world: 2 rank(s)" in out.stdout


def test_sigusr1_to_one_agent_checkpoints_every_rank_and_resume_matches(
    tmp_path: Path, uninterrupted: Path
) -> None:
    """SLURM's early warning (`--signal=USR1@…`) reaching one node's torchrun agent: it forwards the
    signal, both ranks stop after the same step and save it, the agents exit non-zero, and the
    next launch resumes there and matches the uninterrupted run."""
    run = tmp_path
    procs = start_nodes(run, nnodes=2)
    metrics = run / "log" / "metrics.jsonl"
    signalled = None
    deadline = time.time() + 300
    while signalled is None and time.time() < deadline:
        time.sleep(0.05)
        if metrics.exists() and max(losses(run), default=0) >= 3:
            os.kill(procs[0].pid, signal.SIGUSR1)  # node 0's agent only
            signalled = max(losses(run))
    assert signalled is not None and signalled < 25, "the run ended before it could be signalled"
    codes = [p.wait(timeout=300) for p in procs]
    assert all(code != 0 for code in codes), codes
    latest = (run / "ckpt" / "latest").read_text().strip()
    stopped_at = int(latest.removeprefix("step_"))
    assert signalled <= stopped_at < 30
    state = json.loads((run / "ckpt" / latest / "state.json").read_text())
    assert state["world_size"] == 2 and (run / "ckpt" / latest / "rng" / "rank_00001.json").is_file()
    assert "stopped: SIGUSR1 received: stopped after step" in (run / "node0.log").read_text()
    wait(start_nodes(run, nnodes=2), run)  # resumes from the signal's checkpoint
    resumed, ref = losses(run), losses(uninterrupted)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(stopped_at + 1, 31):
        assert abs(resumed[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, resumed[step], ref[step])
