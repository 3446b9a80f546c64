#!/usr/bin/env python
"""Step times of the default INT4 model on this checkout's runtime, for same-run A/Bs between two checkouts.

    cd OTHER_CHECKOUT && python /path/to/scripts/bench_step.py      # alternate with this checkout, same venv

Prints one JSON line: a 128-token prefill, a one-sequence decode step (context 128) and a 16-row batch-invariant
decode step (serve's), each the best of 5 repetitions. TINYSERVE_CPU_KERNEL picks the backend as usual. The runner
is imported from the checkout in the working directory (its tinyserve/ comes first on sys.path), also from
checkouts older than the runtime/ folder (issue 16).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())

try:
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig
except ImportError:  # a checkout from before issue 16
    from tinyserve.runner import ModelRunner, RunnerConfig
from tinyserve_quantize.default_model import quantized_folder


def best(fn, n: int, reps: int = 5) -> float:
    """Seconds per call: the best of `reps` runs of n calls."""
    b = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        b = min(b, (time.perf_counter() - t) / n)
    return b


def main() -> None:
    folder = quantized_folder()
    ids = list(range(100, 228))
    r = ModelRunner(folder, RunnerConfig(device="cpu", max_seq_len=512))
    s = r.alloc_slot()
    prefill = best(lambda: r.prefill(s, ids), 3)
    decode1 = best(lambda: r.decode([s], [5], positions=[128]), 30)
    rs = ModelRunner(folder, RunnerConfig(device="cpu", max_seq_len=512, num_slots=16, batch_invariant=True))
    slots = [rs.alloc_slot() for _ in range(16)]
    for x in slots:
        rs.prefill(x, ids)
    decode16 = best(lambda: rs.decode(slots, [5] * 16, positions=[128] * 16), 5)
    print(json.dumps({"checkout": os.getcwd(), "prefill128_ms": round(prefill * 1e3, 2), "decode1_ms": round(decode1 * 1e3, 2),
                      "decode16_ms": round(decode16 * 1e3, 2)}))


if __name__ == "__main__":
    main()
