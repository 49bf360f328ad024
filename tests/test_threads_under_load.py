"""The fast kernels stay fast when the cores are shared (issue 10 item 5).

The old pool gave each thread a fixed share and the caller spun until every worker had answered: under
load a descheduled worker held the tiny model's 2-thread forward at ~77 ms against 0.2 ms on one thread.
Here a CPU hog (two busy Python processes, one per core, bounded to 60 s and killed in a finally) runs
while the tiny default model (64/2/8/2/128, seq 5, batch 2) is timed:

* fast kernels, 2 threads, not slower than 1 thread by more than SLACK (1.5x: the allowance for noise
  on a shared 2-core machine; a collapse is 100x and more);
* fast kernels not slower than the readable ones (also by at most SLACK).

A second model big enough that the pool really splits its work (hidden 256, seq 64, batch 2: the
tiny one runs every op on one thread, below the `parallel` thresholds) checks the pool itself: there
the old pool's 2-thread median was 9-16x its 1-thread one under load; allowed here: POOL_SLACK (4x:
a shared 2-core machine gives the second thread nothing, and a descheduled worker can still hold
the chunk it claimed).

Medians over many runs, 1- and 2-thread blocks interleaved so drifting load hits both alike, and one
retry before failing. The ratios are printed (pytest -s).
"""

import subprocess
import sys
import time

import numpy as np
import pytest

from celerinfer_lab.config import ModelConfig
from celerinfer_lab.generate import generate_model

pytestmark = pytest.mark.exclusive  # it times the pool against its own CPU hogs, not another test's load

SLACK = 1.5  # a ratio within this factor is noise, not a slowdown
POOL_SLACK = 4.0  # the same for the model that dispatches to the pool (the old pool: 9-16x; a noisy
#                   idle CI run on 2026-11-28 measured 2.6x twice in a row, so 2.5x flaked)

HOG = "import time\nend = time.time() + 60\nwhile time.time() < end: pass\n"


def _medians(native, model, settings, blocks, runs) -> dict[str, float]:
    """Median forward time (ms) per (kernels, threads), blocks interleaved."""
    runners = {}
    for kernels in {k for k, _ in settings}:
        prepared = native.prepare(model, kernels)
        ids, mask = prepared.check_inputs(None, None)
        logits = np.empty((model.batch_size, model.seq_len, model.config.vocab_size), dtype=np.float32)
        runners[kernels] = (prepared, ids, mask, logits)
    times: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    for _ in range(blocks):
        for kernels, threads in settings:
            native.set_threads(threads)
            prepared, ids, mask, logits = runners[kernels]
            for _ in range(3):  # warm-up
                prepared.run(ids, mask, logits)
            for _ in range(runs):
                start = time.perf_counter()
                prepared.run(ids, mask, logits)
                times[kernels, threads].append((time.perf_counter() - start) * 1e3)
    return {f"{k}/{t}": float(np.median(v)) for (k, t), v in times.items()}


def _check(medians: dict[str, float], slack: float) -> list[str]:
    problems = []
    if medians["fast/2"] > slack * medians["fast/1"]:
        problems.append(f"fast kernels: 2 threads {medians['fast/2']:.3f} ms vs 1 thread {medians['fast/1']:.3f} ms")
    if "readable/1" in medians and min(medians["fast/1"], medians["fast/2"]) > SLACK * medians["readable/1"]:
        problems.append(f"fast {medians['fast/1']:.3f} ms slower than readable {medians['readable/1']:.3f} ms")
    return problems


CASES = {  # name: (config, seq_len, settings timed, blocks, runs per block, allowed 2t/1t ratio)
    "tiny": (ModelConfig(64, 2, 8, 2, 128), 5, [("fast", 1), ("fast", 2), ("readable", 1)], 6, 40, SLACK),
    "pool": (ModelConfig(256, 2, 8, 2, 128), 64, [("fast", 1), ("fast", 2)], 4, 10, POOL_SLACK),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hogs", [0, 2], ids=["idle", "loaded"])
def test_fast_kernels_stay_fast(native, hogs, case):
    config, seq_len, settings, blocks, runs, slack = CASES[case]
    model = generate_model(config, 2, seq_len, seed=0)
    before = native.threads
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(hogs)]
    try:
        time.sleep(0.3 if hogs else 0)  # let the hogs take the cores
        for attempt in (1, 2):
            medians = _medians(native, model, settings, blocks, runs)
            print(
                f"\n{case} model, {hogs} hogs, attempt {attempt}: "
                + ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items())
                + f"; 2 threads / 1 thread = {medians['fast/2'] / medians['fast/1']:.2f}x (allowed {slack}x)"
                + (
                    f", readable / fast = {medians['readable/1'] / medians['fast/1']:.1f}x"
                    if "readable/1" in medians
                    else ""
                )
            )
            problems = _check(medians, slack)
            if not problems:
                break
        assert not problems, "; ".join(problems)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        native.set_threads(before)
