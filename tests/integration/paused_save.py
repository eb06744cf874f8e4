"""`deepsuite …` with the checkpoint save of one step stopped at a named point, for the kill-safety
tests: ``python paused_save.py <point>@<step> train …`` prints ``DEEPSUITE_TEST_PAUSED <point>@<step>``
on stderr when the save of that step reaches the point, then waits to be killed.

The points are the stages of `deepsuite.checkpoint.manager.save_checkpoint`; each is reached when
the helper that completes it returns (wrapped here, so the package itself carries no test hook).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from deepsuite.checkpoint import manager
from deepsuite.cli import main

AFTER = {
    "tmp_created": "_fresh_tmp",  # tmp-step_N/ exists, empty
    "engine_saved": "_write_rank_files",  # DeepSpeed files and RNG states written, no state.json
    "state_written": "_write_state",  # complete but not renamed
    "renamed": "_publish",  # step_N/ complete, `latest` still names the previous checkpoint
    "latest_updated": "_point_latest",  # `latest` names step_N, rotation not yet done
}


def pause_after(point: str, step: int) -> None:
    """Wrap the helper that completes ``point`` so that it stops the process when called for ``step``."""
    helper = getattr(manager, AFTER[point])
    names = {f"step_{step}", f"tmp-step_{step}"}

    def paused(*args: Any, **kwargs: Any) -> Any:
        out = helper(*args, **kwargs)
        if any(isinstance(a, (str, Path)) and Path(a).name in names for a in args):
            print(f"DEEPSUITE_TEST_PAUSED {point}@{step}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        return out

    setattr(manager, AFTER[point], paused)


if __name__ == "__main__":
    point, _, step = sys.argv[1].partition("@")
    pause_after(point, int(step))
    raise SystemExit(main(sys.argv[2:]))
