"""One function over many cases in worker processes, with a progress bar (as nnU-Net's preprocessing does it: one
case per task, so memory is about one case per process)."""
from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence

from tqdm import tqdm


def second_is_text(result: tuple) -> bool:
    """The convention of the case workers: ``(case, reason)`` where a ``str`` reason means the case failed."""
    return isinstance(result[1], str)


def parallel(fn: Callable[[object], tuple], jobs: Sequence, processes: int, desc: str,
             failed: Callable[[tuple], bool] | None = second_is_text, progress: bool = True) -> Iterator[tuple]:
    """``fn(job)`` for every job, in completion order, in up to ``processes`` spawned worker processes (in this
    process when one is enough), with a progress bar on stderr that counts the results ``failed`` calls failures
    (``None``: counts nothing; ``progress=False``: no bar). ``fn`` must be a module-level function and its jobs
    picklable."""
    bar = tqdm(total=len(jobs), desc=desc, unit="case", dynamic_ncols=True, file=sys.stderr, disable=not progress)
    failures = 0

    def report(result: tuple) -> tuple:
        nonlocal failures
        if failed is not None:
            failures += failed(result)
            bar.set_postfix(skipped=failures)
        bar.update(1)
        return result

    processes = min(processes, len(jobs))
    if processes <= 1:
        for job in jobs:
            yield report(fn(job))
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            for result in pool.imap_unordered(fn, jobs, chunksize=1):
                yield report(result)
    bar.close()
