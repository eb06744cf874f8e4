"""Helpers shared by the benchmarks: timing, peak memory, a measured matmul peak, environment info.

Every benchmark compares deepsuite against a reference measured in the same run and reports
ratios; absolute figures depend on the machine (and on a shared CPU, on its neighbours).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: str | torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str | torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls (synchronising CUDA around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def matmul_peak_flops(
    device: str | torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 5
) -> float:
    """Measured FLOP/s of an ``n × n × n`` matmul in ``dtype`` on ``device`` (the MFU denominator).

    Default ``n``: 8192 on CUDA, 2048 on CPU. Random normal inputs (zeros run faster on GPUs).
    """
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = time_fn(lambda: a @ b, device, warmup=2, iters=iters)
    return 2.0 * n**3 / seconds


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new CUDA peak-memory window (CPU peaks are per process: see `run_isolated`)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def cuda_peak_memory_mb() -> float:
    """Peak CUDA memory allocated by torch since the last reset, in MiB."""
    return torch.cuda.max_memory_allocated() / 2**20


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_isolated(script: str | Path, worker_args: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --worker '<json>'`` in a fresh Python process and return the JSON dict it prints
    last. A fresh process gives an honest CPU peak (ru_maxrss) per measurement."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(worker_args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {Path(script).name} {worker_args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Device name, library versions and CPU count, for the results JSON."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "transformer_engine": _version("transformer_engine") or _version("transformer-engine"),
        "flash_attn": _version("flash_attn") or _version("flash-attn"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # allocator settings change CPU timings by 20 % or more (fresh large tensors fault their pages)
        "malloc_env": {
            k: os.environ[k]
            for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")
            if k in os.environ
        },
    }
    if device.type == "cuda":
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Print ``rows`` as an aligned text table (floats with 4 significant digits)."""
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write ``result`` as indented JSON, creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
