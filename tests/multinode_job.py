"""`python -m probe.ablate ARGS` as a torchrun worker, for tests/commands/test_multinode.py.

- PROBE_TEST_DIE_RANK=R, PROBE_TEST_DIE_AFTER=PIECE: the worker of global rank R dies
  (`os._exit(1)`, like a killed process: no cleanup, no exception) once the piece PIECE is
  saved in the out folder, in torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0);
  the restarted group has to resume from the saved pieces.
- PROBE_TEST_TRACE=FOLDER: each worker writes `FOLDER/<attempt>-<rank>.txt`, one line per
  piece of the sweep's stages, "computed" or "resumed" (the test's own record, outside --out).
"""

import os
import sys
import time
from pathlib import Path

from probe import ablate, job


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def instrument() -> None:
    die_rank, die_after = os.environ.get("PROBE_TEST_DIE_RANK"), os.environ.get("PROBE_TEST_DIE_AFTER")
    trace = os.environ.get("PROBE_TEST_TRACE")
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    original = job._piece

    def traced_piece(run_dir, name, kind, compute):
        computed = []
        value = original(run_dir, name, kind, lambda: computed.append(name) or compute())
        if trace:
            with open(Path(trace) / f"{attempt()}-{os.environ.get('RANK')}.txt", "a") as handle:
                handle.write(f"{name} {'computed' if computed else 'resumed'}\n")
        if name == die_after and os.environ.get("RANK") == die_rank and attempt() == 0:
            deadline = time.monotonic() + 60  # rank 0 saves it; another rank waits until it is there
            while not (out / "partial" / f"{name}.pt").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(1)
        return value

    job._piece = traced_piece


if __name__ == "__main__":
    instrument()
    raise SystemExit(ablate.main(sys.argv[1:]))
