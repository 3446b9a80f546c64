"""Ablations of the AWQ search on the default model (or --model): which steps earn their place (BENCHMARKS.md, issue 2).

    python scripts/quantize_ablations.py [--variants NAME ...] [--stats-variants] [--max-tokens 16384]
                                         [--model DIR] [--group-size 64] [--n-samples 128] [--text FILE]

The calibration statistics (block inputs run through the unquantized model) do not depend on the search settings,
so they are collected once and every search variant reuses them; each variant then prints its evaluation-slice
perplexity (the FACTS.md protocol), its search time and its summed held-out output error relative to RTN.
--stats-variants also re-collects statistics for the settings that change them (fp32 forward, token stride,
fewer calibration windows) and times the full pipeline for each. Baselines (fp16, RTN) are measured in the same run.
"""

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from tinyserve_quantize.awq import QuantResult, SearchConfig, dequantize_into, quantize_block
from tinyserve_quantize.blocks import LoadedModel
from tinyserve_quantize.blockwise import gate_windows
from tinyserve_quantize.calibration import calibration_windows, capture_block_inputs, run_block
from tinyserve_quantize.clip_gate import Gate
from tinyserve_quantize.default_model import DEFAULT_RECIPE, ensure_fp16_default
from tinyserve_quantize.evaluate import perplexity, text_ids
from tinyserve_quantize.methods import ResultSink, quantize_model
from tinyserve_quantize.model_families import family_for
from tinyserve_quantize.model_io import load_model, load_tokenizer, read_config
from tinyserve_quantize.quantizer import QuantSpec
from tinyserve_quantize.text_data import calib_text, eval_text

BASE = SearchConfig()
VARIANTS = {
    "default": BASE,
    "no-clip": replace(BASE, clip=False),
    "no-scale": replace(BASE, scale=False),
    "duo": replace(BASE, duo_scaling=True),
    "clip-sym": replace(BASE, clip_mode="sym"),
    "no-gate": replace(BASE, holdout_gate=False),
    "autoawq-like": replace(BASE, duo_scaling=True, clip_mode="sym", holdout_gate=False),
    "clip-qk": replace(BASE, clip_qk=True),
    "clip-range2d": replace(BASE, clip_mode="range2d"),
    "no-gqa-vo": replace(BASE, gqa_vo=False),
    "no-refit": replace(BASE, refit=False),
    "no-clip-gate": replace(BASE, clip_gate=False),
    "gate-z0": replace(BASE, gate_z=0.0),
    "gate-8-windows": replace(BASE, gate_windows=8),
}
STATS_VARIANTS = {
    "fp32": dict(search=replace(BASE, compute_dtype=torch.float32)),
    "stride4": dict(search=replace(BASE, token_stride=4)),
    "16-windows": dict(n_samples=16),
}


def collect_stats(model, family, windows, search: SearchConfig) -> list[dict]:
    layers = model.get_submodule(family.layers)
    inputs, kw = capture_block_inputs(model, layers, windows)
    stats = []
    for block in layers:
        runner = copy.deepcopy(block).to(search.compute_dtype)
        sites = {g.linears[0]: runner.get_submodule(g.linears[0]) for g in family.groups}
        inputs, st = run_block(runner, inputs, kw, sites, search.holdout_every, search.token_stride)
        stats.append(st)
    return stats


def quantize_from_stats(model, family, spec, stats, search, windows) -> QuantResult:
    """awq's per-block steps (and its gate) on statistics collected once, as blockwise.quantize_blocks runs them."""
    source, sink, report = LoadedModel(model, family), ResultSink(model), []
    with tempfile.TemporaryDirectory(prefix="ablation-gate-") as spill:
        gate = Gate(source, gate_windows(windows, search), spec.group_size, Path(spill), search.compute_dtype, search.gate_z,
                    search.gate_cache_bytes) if search.clip_gate else None
        for i, block in enumerate(model.get_submodule(family.layers)):
            out = quantize_block(block, i, family, spec, search, stats[i], alternatives=gate is not None)
            report += out.report
            if gate is not None:
                gate.record(block, out)
            else:
                sink.block(out.linears, out.params)
        if gate is not None:
            if gate.rows:
                gate.decide()
                gate.annotate(report)
            for i in range(len(source)):
                sink.block(*gate.block(i))
    return QuantResult(sink.linears, report)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--stats-variants", nargs="*", default=[], choices=list(STATS_VARIANTS))
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--model", type=Path, help="fp16/bf16/fp32 model folder (default: the embedded default model)")
    p.add_argument("--group-size", type=int, default=DEFAULT_RECIPE.group_size)
    p.add_argument("--n-samples", type=int, default=128, help="calibration windows of 512 tokens")
    p.add_argument("--text", type=Path, help="evaluation text (default: the built-in evaluation slice)")
    a = p.parse_args()

    src = a.model or ensure_fp16_default()
    tok = load_tokenizer(src)
    family = family_for(read_config(src))
    spec = QuantSpec(4, a.group_size)
    ids = text_ids(tok, a.text.read_text(encoding="utf-8") if a.text else eval_text(), a.max_tokens)

    def evaluate(model) -> float:
        return perplexity(model, ids)[0]

    def line(name, ppl, seconds, result=None):
        ratio = ""
        if result is not None and result.report and "mse_awq" in result.report[0]:
            ratio = f"{sum(r['mse_awq'] for r in result.report) / sum(r['mse_rtn'] for r in result.report):.3f}"
        print(f"| {name} | {ppl:.2f} | {seconds:.1f} | {ratio} |", flush=True)

    print("| variant | perplexity | seconds | held-out output error / RTN |")
    print("|---|---:|---:|---:|", flush=True)
    if not a.no_baselines:
        model = load_model(src)
        line("fp16", evaluate(model), 0)
        t = time.perf_counter()
        result = quantize_model("rtn", model, family, spec, None, progress=False)
        seconds = time.perf_counter() - t
        dequantize_into(model, result, spec.group_size)
        line("RTN", evaluate(model), seconds)

    windows = calibration_windows(tok, calib_text(), a.n_samples, 512)
    if a.variants:
        t = time.perf_counter()
        stats = collect_stats(load_model(src), family, windows, BASE)
        print(f"(statistics of {windows.numel()} calibration tokens collected in {time.perf_counter() - t:.1f} s)", flush=True)
        for name in a.variants:
            model = load_model(src)
            t = time.perf_counter()
            result = quantize_from_stats(model, family, spec, stats, VARIANTS[name], windows)
            seconds = time.perf_counter() - t
            dequantize_into(model, result, spec.group_size)
            line(f"{name} (search only)", evaluate(model), seconds, result)
        del stats
    for name in a.stats_variants:
        v = STATS_VARIANTS[name]
        search = v.get("search", BASE)
        w = calibration_windows(tok, calib_text(), v.get("n_samples", a.n_samples), 512)
        model = load_model(src)
        t = time.perf_counter()
        stats = collect_stats(model, family, w, search)
        result = quantize_from_stats(model, family, spec, stats, search, w)
        seconds = time.perf_counter() - t
        dequantize_into(model, result, spec.group_size)
        line(f"{name} (statistics + search)", evaluate(model), seconds, result)


if __name__ == "__main__":
    main()
