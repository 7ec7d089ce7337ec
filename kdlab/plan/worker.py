"""`python -m kdlab.plan.worker`: run one job of a plan, read as JSON from stdin.

Started by the parallel executor (`kdlab.plan.executor`) with its share of the cores in
KDLAB_THREADS (and OMP_NUM_THREADS, set before torch loads) and, on GPUs, one device in
CUDA_VISIBLE_DEVICES. Exit status: 0 done, 1 failed (the last line 'kdlab worker: error: ...'
says why), 130 interrupted (Ctrl-C, or the executor died: the run saved its place).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from kdlab.errors import KDLabError  # lazy: logging is set up before kdlab (and torch) load

    try:
        from kdlab.plan.jobs import Job, run_job  # lazy: an import error becomes the job's one-line error

        job = Job.from_json(json.load(sys.stdin))
        threads = os.environ.get("KDLAB_THREADS")
        if threads:
            import torch  # lazy: as above

            torch.set_num_threads(int(threads))
        run_job(job)
    except KeyboardInterrupt:
        print("kdlab worker: interrupted; the run saved its place (run the command again to continue)",
              file=sys.stderr)
        return 130
    except KDLabError as exc:
        print(f"kdlab worker: error: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:  # noqa: BLE001 - anything else: the traceback for the log, one line for the table
        traceback.print_exc()
        print(f"kdlab worker: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
