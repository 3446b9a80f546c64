"""Quantize a model with the reference implementation, AutoAWQ 0.2.9, on exactly our calibration windows.

AutoAWQ needs transformers 4.x (its last tested pair: torch 2.6, transformers 4.51.3), so it runs in its own venv;
this script has two halves, one per venv:

    # 1. in our venv: write the calibration windows `python -m tinyserve_quantize` would use, as token ids (JSON)
    .venv/bin/python scripts/autoawq_reference.py windows --model MODEL --n-samples 32 --out windows.json
    # 2. in a venv with autoawq==0.2.9 (--no-deps), transformers==4.51.3, accelerate, datasets, torch==2.13.0:
    awqref/bin/python scripts/autoawq_reference.py quantize --model MODEL --windows windows.json --out OUT
    # then evaluate OUT like our folders (AutoAWQ writes the same GEMM layout):
    .venv/bin/python -m tinyserve_quantize.evaluate --model OUT --json

AutoAWQ 0.2.9 is broken on CPU as shipped (../shared/FACTS.md): `_compute_best_scale` snapshots the weights with
`.cpu()`, which on a CPU tensor is the same storage, then scales them in place. Step 2 refuses to run unless that
line of the installed copy clones (`v.detach().clone().cpu()`). Compute is fp32 (fp16 matmuls crawl on CPU).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def write_windows(a) -> None:
    from transformers import AutoTokenizer

    from tinyserve_quantize.calibration import calibration_windows
    from tinyserve_quantize.text_data import calib_text

    tok = AutoTokenizer.from_pretrained(a.model)
    text = a.calib_text.read_text(encoding="utf-8") if a.calib_text else calib_text()
    windows = calibration_windows(tok, text, a.n_samples, a.seqlen)
    a.out.write_text(json.dumps(windows.tolist()))
    print(f"{len(windows)} windows of {windows.shape[1]} tokens -> {a.out}")


def quantize(a) -> None:
    import inspect
    import resource

    import torch
    from awq import AutoAWQForCausalLM
    from awq.quantize import quantizer

    if ".detach().clone().cpu()" not in inspect.getsource(quantizer.AwqQuantizer._compute_best_scale):
        sys.exit(f"patch {inspect.getsourcefile(quantizer)} first: in _compute_best_scale, org_sd must clone (v.detach().clone().cpu())")
    torch.set_num_threads(a.threads or torch.get_num_threads())
    windows = json.loads(a.windows.read_text())
    model = AutoAWQForCausalLM.from_pretrained(str(a.model), torch_dtype=torch.float32, device_map="cpu")
    cfg = {"zero_point": True, "q_group_size": a.group_size, "w_bit": a.w_bit, "version": "GEMM"}
    t0 = time.perf_counter()
    # Token lists of exactly seqlen: AutoAWQ concatenates them and splits again at seqlen, giving the same windows.
    # No tokenizer: AutoAWQ uses it only to encode text, and transformers 4.x cannot read tokenizer files 5.x wrote.
    model.quantize(None, quant_config=cfg, calib_data=windows, max_calib_samples=len(windows),
                   max_calib_seq_len=len(windows[0]), n_parallel_calib_samples=a.parallel)
    seconds = time.perf_counter() - t0
    model.model.half()
    model.save_quantized(str(a.out))
    for f in a.model.iterdir():  # tokenizer and generation files, as they are
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")) and not (a.out / f.name).exists():
            shutil.copy2(f, a.out / f.name)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"quantize_s": round(seconds, 1), "peak_rss_gib": round(peak, 2), "threads": torch.get_num_threads(),
                      "windows": len(windows), "out": str(a.out)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("windows", help="our venv: write the calibration windows as token ids")
    w.add_argument("--model", type=Path, required=True)
    w.add_argument("--calib-text", type=Path)
    w.add_argument("--n-samples", type=int, default=128)
    w.add_argument("--seqlen", type=int, default=512)
    w.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("quantize", help="AutoAWQ's venv: quantize on those windows")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--windows", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--w-bit", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--threads", type=int, default=0)
    q.add_argument("--parallel", type=int, default=None, help="windows per forward pass (AutoAWQ's n_parallel_calib_samples)")
    a = p.parse_args()
    write_windows(a) if a.cmd == "windows" else quantize(a)


if __name__ == "__main__":
    main()
