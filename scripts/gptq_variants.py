"""GPTQ and AWQ + GPTQ design choices on the default model (BENCHMARKS.md, issue 7).

    python scripts/gptq_variants.py [--variants NAME ...] [--w-bit 4] [--max-tokens 16384] [--no-baselines]

Each variant quantizes SmolLM2 from scratch (the calibration passes depend on the variant: quantized or unquantized
previous blocks) and prints its evaluation-slice perplexity (the FACTS.md protocol), its quantization time and its
summed held-out per-linear output error relative to RTN. fp16 and RTN are measured in the same run.
"""

import argparse
import time
from dataclasses import replace

import torch

from tinyserve_quantize.awq import SearchConfig, dequantize_into
from tinyserve_quantize.calibration import calibration_windows
from tinyserve_quantize.default_model import DEFAULT_RECIPE, ensure_fp16_default
from tinyserve_quantize.evaluate import perplexity, text_ids
from tinyserve_quantize.gptq import GPTQConfig
from tinyserve_quantize.methods import quantize_model
from tinyserve_quantize.model_families import family_for
from tinyserve_quantize.model_io import load_model, load_tokenizer, read_config
from tinyserve_quantize.quantizer import QuantSpec
from tinyserve_quantize.text_data import calib_text, eval_text

BASE = GPTQConfig()
SEARCH = SearchConfig()
VARIANTS = {  # name -> (method, GPTQConfig, SearchConfig)
    "gptq": ("gptq", BASE, SEARCH),
    "gptq-fp-inputs": ("gptq", replace(BASE, calib_inputs="fp"), SEARCH),
    "gptq-act-order": ("gptq", replace(BASE, act_order=True), SEARCH),
    "gptq-all-windows": ("gptq", BASE, replace(SEARCH, holdout_every=0)),
    "gptq-fp32-passes": ("gptq", BASE, replace(SEARCH, compute_dtype=torch.float32)),
    "awq-gptq": ("awq-gptq", BASE, SEARCH),
    "awq-gptq-fp-inputs": ("awq-gptq", replace(BASE, calib_inputs="fp"), SEARCH),
    "awq-gptq-clip": ("awq-gptq", replace(BASE, awq_clip=True), SEARCH),
    "awq-gptq-act-order": ("awq-gptq", replace(BASE, act_order=True), SEARCH),
    "awq": ("awq", BASE, SEARCH),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--w-bit", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--no-baselines", action="store_true")
    a = p.parse_args()

    src = ensure_fp16_default()
    tok = load_tokenizer(src)
    family = family_for(read_config(src))
    spec = QuantSpec(a.w_bit, DEFAULT_RECIPE.group_size)
    ids = text_ids(tok, eval_text(), a.max_tokens)
    windows = calibration_windows(tok, calib_text(), 128, 512)

    def line(name, ppl, seconds, report=None):
        ratio = ""
        if report and "mse_rtn" in report[0]:
            key = "mse_gptq" if "mse_gptq" in report[0] else "mse_awq"
            ratio = f"{sum(r[key] for r in report) / sum(r['mse_rtn'] for r in report):.3f}"
        print(f"| {name} | {ppl:.2f} | {seconds:.1f} | {ratio} |", flush=True)

    print(f"w{a.w_bit} g{DEFAULT_RECIPE.group_size}, {len(ids)} evaluation tokens, {windows.numel()} calibration tokens")
    print("| variant | perplexity | quantize s | held-out output error / RTN |")
    print("|---|---:|---:|---:|", flush=True)
    if not a.no_baselines:
        model = load_model(src)
        line("fp16", perplexity(model, ids)[0], 0)
        t = time.perf_counter()
        result = quantize_model("rtn", model, family, spec, None, progress=False)
        seconds = time.perf_counter() - t
        dequantize_into(model, result, spec.group_size)
        line("rtn", perplexity(model, ids)[0], seconds)
    for name in a.variants:
        method, gptq, search = VARIANTS[name]
        model = load_model(src)
        t = time.perf_counter()
        result = quantize_model(method, model, family, spec, windows, search, gptq, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - t
        dequantize_into(model, result, spec.group_size)
        line(name, perplexity(model, ids)[0], seconds, result.report)


if __name__ == "__main__":
    main()
