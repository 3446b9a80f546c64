"""Where one single-sequence decode step's time goes on CPU, measured inside the step (not each part alone).

    python scripts/decode_step_parts.py            # the default model (AWQ INT4), context 192, all cores

The parts are those of the step through model.decode_one (the path where the fused C++ step, tinyserve/fused_step.py,
does not apply; the fused step is timed too, as one more row). Each variant replaces one kind of work in the step by a
preallocated output of the right shape (the INT4 linears, the int8 lm_head, all linears, all linears and attention)
and times the step again; the difference is what
that part costs in place, with the caches and threads as the real step leaves them. Variants run in interleaved rounds,
best round each. The numbers of the stubbed steps are garbage; only their times are used.
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()

    from tinyserve_quantize.default_model import ensure_quantized_default
    from tinyserve import model
    from tinyserve.runner import ModelRunner, RunnerConfig

    r = ModelRunner(ensure_quantized_default(), RunnerConfig(device="cpu", max_seq_len=a.context + 8))
    slot = r.alloc_slot()
    r.prefill(slot, list(range(100, 100 + a.context)))
    outs: dict[int, torch.Tensor] = {}

    def stub(self, x):  # a linear's output, allocated once
        if id(self) not in outs:
            n = self.w.out_features if isinstance(self, model.Int4Linear) else r.cfg.vocab_size
            outs[id(self)] = torch.zeros(1, n, dtype=x.dtype)
        return outs[id(self)]

    # Attention is our CPU decode attention where the runner uses it (r.attention), else torch's SDPA: stub whichever runs.
    real = {"int4": model.Int4Linear.one_row, "lm_head": model.Int8Linear.one_row, "sdpa": F.scaled_dot_product_attention,
            "attention": r.attention}
    fused, r.fused = r.fused, None  # the parts below are model.decode_one's
    variants = {
        "fused step (the default)": ("fused",),
        "step": (),
        "without INT4 linears": ("int4",),
        "without lm_head": ("lm_head",),
        "without linears": ("int4", "lm_head"),
        "without linears, attention": ("int4", "lm_head", "sdpa"),
    }
    if fused is None:
        del variants["fused step (the default)"]

    def timed(stubbed) -> float:
        r.fused = fused if "fused" in stubbed else None
        model.Int4Linear.one_row = stub if "int4" in stubbed else real["int4"]
        model.Int8Linear.one_row = stub if "lm_head" in stubbed else real["lm_head"]
        F.scaled_dot_product_attention = (lambda q, k, v: torch.zeros_like(q)) if "sdpa" in stubbed else real["sdpa"]
        if real["attention"] is not None:
            r.attention = (lambda q, k, v, lengths: torch.zeros_like(q)) if "sdpa" in stubbed else real["attention"]
        for _ in range(5):
            r.decode([slot], [1], positions=[a.context - 1])
        t = time.perf_counter()
        for _ in range(30):
            r.decode([slot], [1], positions=[a.context - 1])
        return (time.perf_counter() - t) / 30 * 1e3

    best = {name: float("inf") for name in variants}
    for _ in range(a.rounds):
        for name, stubbed in variants.items():
            best[name] = min(best[name], timed(stubbed))
    timed(())
    print(f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, context {a.context}; ms per step, best of {a.rounds}")
    for name, t in best.items():
        print(f"  {name:28s} {t:6.2f}")
    s = best["step"]
    print(f"in the step: INT4 linears {s - best['without INT4 linears']:.2f}, int8 lm_head {s - best['without lm_head']:.2f}, "
          f"attention {best['without linears'] - best['without linears, attention']:.2f}, "
          f"everything else (norms, RoPE, cache writes, residuals, Python, runner) {best['without linears, attention']:.2f}")


if __name__ == "__main__":
    main()
