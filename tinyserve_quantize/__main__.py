"""python -m tinyserve_quantize: INT4 quantization of a Hugging Face model folder into the AutoAWQ GEMM layout, by
AWQ + GPTQ with v_proj rounded against its attention-averaged inputs (the default), AWQ + GPTQ, AWQ, GPTQ or RTN.

    python -m tinyserve_quantize --model DIR --out DIR [--method awq-gptq-attn|awq-gptq|awq|gptq|rtn] [--w-bit 4] [--group-size 64]
                       [--calib-text FILE] [--n-samples 128] [--seqlen 512] [--fake] [--overwrite]
                       [--max-shard-size 5GB] [--device auto|cpu|cuda] [--gate-cache-size 2GiB]

The model is read from its checkpoint one decoder block at a time (never loaded whole). Writes to a temporary folder and renames it into place at the end; refuses to replace an existing --out without
--overwrite. Mistakes (missing or malformed folder, unsupported architecture or dtype, bad settings) are reported in
one line, without a traceback. 3-bit codes are stored in the same 4-bit containers, with "bits": 3 in config.json.
"""

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from tinyserve_quantize.awq import SearchConfig, native_compute_dtype
from tinyserve_quantize.clip_search import CLIP_MODES
from tinyserve_quantize.export import SHARD_BYTES
from tinyserve_quantize.gptq import CALIB_INPUTS, GPTQConfig
from tinyserve_quantize.pipeline import USER_ERRORS, QuantizeConfig, run
from tinyserve_quantize.quantizer import SUPPORTED_GROUP_SIZES


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def byte_size(text: str, minimum: int = 1) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes (GB = 10**9, as transformers' max_shard_size reads it)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS or float(m.group(1)) * SIZE_UNITS[m.group(2).upper()] < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 2GiB" + (" (or 0)" if minimum == 0 else ""))
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def parse_args(argv: list[str] | None = None) -> QuantizeConfig:
    p = argparse.ArgumentParser(prog="python -m tinyserve_quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="source model folder (fp16/bf16/fp32 safetensors)")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--method", default="awq-gptq-attn",
                   help="awq-gptq-attn (default: AWQ's scales, then GPTQ's rounding, v_proj's against its attention-averaged "
                        "inputs), awq-gptq, awq, gptq or rtn (plain round-to-nearest baseline)")
    p.add_argument("--w-bit", type=int, default=4, help="weight bits: 4 (default) or 3")
    p.add_argument("--group-size", type=int, default=64,
                   help=f"input channels per quantization group: {', '.join(map(str, SUPPORTED_GROUP_SIZES))} (-1: per output channel); default 64")
    p.add_argument("--calib-text", type=Path, help="UTF-8 calibration text (default: built-in Botchan chapters V-XI)")
    p.add_argument("--n-samples", type=int, default=128,
                   help="calibration windows (default 128; a shorter text gives fewer, all of which are used)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--fake", action="store_true", help="write quantize-dequantized fp16 weights instead of packed INT4")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto",
                   help="where the blocks are quantized: auto (default: CUDA when present), cpu or cuda; the model is streamed "
                        "one block at a time, so it never has to fit in GPU memory (rtn always runs on the CPU: it only reads and rounds)")
    p.add_argument("--max-shard-size", type=byte_size, default=SHARD_BYTES,
                   help="largest weights file; above it, model-0000i-of-0000n.safetensors + index (default 5GB)")
    g = p.add_argument_group("search (AWQ; defaults are what measured best, see BENCHMARKS.md)")
    g.add_argument("--duo-scaling", action="store_true", help="scales x_mean^a / w_mean^(1-a) (AutoAWQ's default)")
    g.add_argument("--no-scale", action="store_true", help="skip the scale search (clip only)")
    g.add_argument("--no-clip", action="store_true", help="skip the clip search")
    g.add_argument("--no-gqa-vo", action="store_true",
                   help="leave v_proj -> o_proj unscaled under grouped-query attention (as AutoAWQ does)")
    g.add_argument("--no-refit", action="store_true", help="skip the least-squares refit of each group's step after clipping")
    g.add_argument("--clip-mode", default="range", help=f"how a ratio shrinks a group's range: {' or '.join(CLIP_MODES)}")
    g.add_argument("--no-holdout-gate", action="store_true",
                   help="keep every chosen scale/clip even where it loses to none on the held-out windows")
    g.add_argument("--no-clip-gate", action="store_true",
                   help="keep the search's choices without testing each sub-block against its unclipped and RTN weights by the model's output (clip_gate.py)")
    g.add_argument("--gate-windows", type=int, default=8, help="held-out calibration windows the gate runs on (default 8)")
    g.add_argument("--gate-cache-size", type=lambda t: byte_size(t, 0), default=SearchConfig.gate_cache_bytes,
                   help="dequantized blocks the gate keeps in memory (default 2GiB; 0: none); the others are re-read from its spill on disk")
    g.add_argument("--token-stride", type=int, default=1, help="use every n-th calibration token for the error statistics")
    g.add_argument("--fp32", action="store_true", help="run the calibration forward passes and error products in fp32 (default: bf16 where the CPU or GPU computes it natively, fp32 on an AVX2-only CPU; awq-gptq-attn calibrates in fp32 always)")
    g = p.add_argument_group("GPTQ (gptq, awq-gptq and awq-gptq-attn)")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction,
                   help="visit columns by decreasing Hessian diagonal, groups keeping fixed, contiguous grids "
                        "(default: on for awq-gptq-attn, off for gptq and awq-gptq)")
    g.add_argument("--percdamp", type=float, default=0.01, help="damping as a share of the Hessian's mean diagonal (default 0.01)")
    g.add_argument("--calib-inputs", default="quantized",
                   help=f"each block calibrates on the outputs of the {' or '.join(CALIB_INPUTS)} blocks before it (default quantized)")
    a = p.parse_args(argv)
    search = SearchConfig(
        duo_scaling=a.duo_scaling, scale=not a.no_scale, clip=not a.no_clip, gqa_vo=not a.no_gqa_vo, refit=not a.no_refit, clip_mode=a.clip_mode,
        holdout_gate=not a.no_holdout_gate, clip_gate=not a.no_clip_gate, gate_windows=a.gate_windows, gate_cache_bytes=a.gate_cache_size,
        token_stride=a.token_stride,
        compute_dtype=torch.float32 if a.fp32 else native_compute_dtype(),
    )
    gptq = GPTQConfig(percdamp=a.percdamp, act_order=a.act_order, calib_inputs=a.calib_inputs)
    return QuantizeConfig(a.model, a.out, a.method, a.w_bit, a.group_size, a.calib_text, a.n_samples, a.seqlen,
                          a.fake, a.overwrite, search, gptq, a.max_shard_size, a.device)


def main(cfg: QuantizeConfig) -> dict:
    return run(cfg)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        main(parse_args())
    except USER_ERRORS as e:
        sys.exit(f"quantize: error: {e}")
    except KeyboardInterrupt:
        sys.exit("quantize: interrupted; nothing was written")
