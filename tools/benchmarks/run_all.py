"""Run every benchmark in tools/benchmarks and write one JSON of results next to a printed table.

    python tools/benchmarks/run_all.py [--quick] [--only NAME ...] [--device cpu|cuda] [--out PATH]

A benchmark is any ``tools/benchmarks/*.py`` exposing ``run(quick=False, ...)`` that returns a
JSON-able dict (with ratios against its reference measured in the same run). ``--device`` is
passed to the ``run`` functions that take a ``device`` argument. A benchmark that raises is
reported in the table and the JSON; the others still run. Default output:
``tools/benchmarks/results/<device>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from common import RESULTS_DIR, env_info, print_table, write_json  # noqa: E402

_NOT_BENCHMARKS = {"common", "run_all"}


def discover() -> dict[str, ModuleType]:
    """Name -> module for every benchmark file with a ``run`` function."""
    found: dict[str, ModuleType] = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem in _NOT_BENCHMARKS or path.stem.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if callable(getattr(module, "run", None)):
            found[path.stem] = module
    return found


def _flat_ratios(result: dict[str, Any]) -> str:
    ratios = result.get("ratios") or {}
    if "train" in result and "loss_gap_pct" in result["train"]:
        ratios = {**ratios, "fp8 loss gap %": result["train"]["loss_gap_pct"]}
    if "linear" in result:
        for row in result["linear"]:
            for key, value in row.items():
                if key.endswith("speedup"):
                    ratios[f"{row['M,K,N']} {key}"] = value
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    return "; ".join(f"{k}={v:.3g}" for k, v in ratios.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="pass quick=True to every benchmark")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names (file stems) to run")
    parser.add_argument("--device", default="cpu", help="device for benchmarks that take one (default cpu)")
    parser.add_argument(
        "--out",
        default=None,
        help="results JSON (default tools/benchmarks/results/<device>.json; <device>_quick[_NAMES].json for "
        "--quick / --only runs)",
    )
    args = parser.parse_args()

    benchmarks = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(benchmarks))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {sorted(benchmarks)}")
        benchmarks = {k: v for k, v in benchmarks.items() if k in args.only}
    results: dict[str, Any] = {"env": env_info(args.device), "quick": args.quick, "benchmarks": {}}
    rows = []
    for name, module in benchmarks.items():
        kwargs: dict[str, Any] = {"quick": args.quick}
        if "device" in inspect.signature(module.run).parameters:
            kwargs["device"] = args.device
        print(f"== {name} {kwargs}", flush=True)
        t0 = time.perf_counter()
        try:
            result = module.run(**kwargs)
            status = "skipped" if "skipped" in result else "ok"
        except Exception as err:  # one failing benchmark is reported, not fatal
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            status = "error"
            print(result["traceback"], file=sys.stderr)
        seconds = time.perf_counter() - t0
        results["benchmarks"][name] = {"status": status, "seconds": seconds, "result": result}
        summary = result.get("error") if status == "error" else _flat_ratios(result)
        rows.append({"benchmark": name, "status": status, "seconds": seconds, "summary": summary})
    print()
    print_table(rows, ["benchmark", "status", "seconds", "summary"])
    # a --quick or --only run does not overwrite the full run's results
    partial = "_quick" if args.quick else ""
    partial += "_" + "_".join(args.only) if args.only else ""
    out = Path(args.out) if args.out else RESULTS_DIR / f"{args.device}{partial}.json"
    write_json(results, out)
    print(f"\nwrote {out}")
    if any(r["status"] == "error" for r in rows) and len(rows) == sum(r["status"] == "error" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
