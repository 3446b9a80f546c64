#!/usr/bin/env python
"""Seconds of one decoder block's AWQ search, by phase, for same-run A/Bs between two checkouts.

    python scripts/bench_awq_search.py --model FOLDER --group-size 128 --n-samples 32 [--block 0] [--repeat 3]
    cd OTHER_CHECKOUT && python /path/to/scripts/bench_awq_search.py ...      # alternate with this checkout

The phases are those of awq.quantize_block, in its order: run_block (the bf16 calibration pass collecting x_mean and
the Gram matrices), search_scales + fold_scales per scaling group, search_clip + refit_bounds per clipped linear.
Blocks before --block run once, untimed, to give it its real inputs. Prints one JSON line per repetition, each on a
fresh copy of the block; --profile then runs it once more under torch.profiler and prints the top ops. The quantizer
is imported from the checkout in the working directory (only the signatures of the modules named above are used).
"""

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())

import torch

from tinyserve_quantize.calibration import calibration_windows, capture_block_inputs, run_block
from tinyserve_quantize.clip_search import clip_ratios, refit_bounds, search_clip
from tinyserve_quantize.model_families import family_for
from tinyserve_quantize.model_io import load_model, load_tokenizer, read_config
from tinyserve_quantize.quantizer import QuantSpec
from tinyserve_quantize.scale_search import fold_scales, gqa_tie, search_scales
from tinyserve_quantize.text_data import calib_text

# awq.SearchConfig's defaults, spelled out so that this script only needs the search modules' signatures.
N_GRID, CLIP_GRID, MAX_SHRINK, HOLDOUT_EVERY, COMPUTE_DTYPE = 20, 20, 0.5, 4, torch.bfloat16


def scaling_tie(block, group) -> tuple[bool, torch.Tensor | None]:
    """(can the group be scaled, channel tie): awq's rule, with grouped-query v -> o scaled per v channel."""
    if group.prev is None:
        return False, None
    prev, lin = block.get_submodule(group.prev), block.get_submodule(group.linears[0])
    if not group.needs_matching_shapes or prev.out_features == lin.in_features:
        return True, None
    head_dim = block.get_submodule(group.prev.rsplit(".", 1)[0]).head_dim
    n_heads, n_kv = lin.in_features // head_dim, prev.out_features // head_dim
    return True, gqa_tie(n_heads, n_kv, head_dim)


def search_block(block, inputs, kwargs, family, spec) -> dict[str, float]:
    """Time each phase of one block's search (on the block given, modified in place) -> name -> seconds."""
    t: dict[str, float] = {}

    def lap(name, t0):
        t[name] = t.get(name, 0.0) + time.perf_counter() - t0

    t0 = time.perf_counter()
    runner = copy.deepcopy(block).to(COMPUTE_DTYPE)
    sites = {g.linears[0]: runner.get_submodule(g.linears[0]) for g in family.groups}
    _, stats = run_block(runner, inputs, kwargs, sites, HOLDOUT_EVERY)
    lap("run_block", t0)
    in_scale = {n: torch.ones(block.get_submodule(n).in_features) for n in family.linears}
    for group in family.groups:
        t0 = time.perf_counter()
        lins = [block.get_submodule(n) for n in group.linears]
        scalable, tie = scaling_tie(block, group)
        if scalable:
            choice = search_scales([lin.weight for lin in lins], stats[group.linears[0]], spec, N_GRID,
                                   dtype=COMPUTE_DTYPE, tie=tie)
            if choice.alpha is not None:
                fold_scales(block.get_submodule(group.prev), lins, choice.scales, tie)
                for n in group.linears:
                    in_scale[n] = choice.scales
        lap(f"scale:{group.linears[-1]}", t0)
    ratios = clip_ratios(CLIP_GRID, MAX_SHRINK)
    site = {n: g.linears[0] for g in family.groups for n in g.linears}
    for name in family.linears:
        if name in family.no_clip:
            continue
        t0 = time.perf_counter()
        st, inv = stats[site[name]], 1 / in_scale[name]
        W = block.get_submodule(name).weight.detach()
        H_fit, H_val = st.H_fit * inv[:, None] * inv[None, :], st.H_val * inv[:, None] * inv[None, :]
        clip = search_clip(W, H_fit, H_val, spec, ratios)
        lap(f"clip:{name}", t0)
        t0 = time.perf_counter()
        refit_bounds(W, clip.lo, clip.hi, H_fit, H_val, spec)
        lap(f"refit:{name}", t0)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--block", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    family = family_for(read_config(args.model))
    spec = QuantSpec(4, args.group_size)
    model = load_model(args.model)
    windows = calibration_windows(load_tokenizer(args.model), calib_text(), args.n_samples, args.seqlen)
    layers = model.get_submodule(family.layers)
    with torch.no_grad():
        inputs, kwargs = capture_block_inputs(model, layers, windows)
        for block in layers[: args.block]:
            inputs, _ = run_block(copy.deepcopy(block).to(COMPUTE_DTYPE), inputs, kwargs, {}, HOLDOUT_EVERY)
        for _ in range(args.repeat):
            t = search_block(copy.deepcopy(layers[args.block]), inputs, kwargs, family, spec)
            phases = {k: round(v, 3) for k, v in t.items()}
            print(json.dumps({"checkout": os.getcwd(), "block": args.block, "total_s": round(sum(t.values()), 3),
                              "threads": torch.get_num_threads(), **phases}), flush=True)
        if args.profile:
            with torch.profiler.profile(record_shapes=True) as prof:
                search_block(copy.deepcopy(layers[args.block]), inputs, kwargs, family, spec)
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))

if __name__ == "__main__":
    main()
