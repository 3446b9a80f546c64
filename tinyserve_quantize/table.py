"""python -m tinyserve_quantize.table: the README's main job until the runtime exists.

Prepares the embedded default model (fp16 conversion, then AWQ w4 g64 quantization; both cached under
$TINYSERVE_HOME), and prints the perplexity of fp16, RTN and AWQ on the built-in evaluation slice (Botchan chapters
I-IV, first 16,384 tokens, 512-token windows, no BOS, fp32 compute: the protocol of the reference numbers in
FACTS.md). RTN is quantized in memory (it takes seconds); AWQ is read back from its packed folder.
"""

import argparse
import json
import os
import sys

from tinyserve_quantize.awq import dequantize_into, rtn_quantize
from tinyserve_quantize.default_model import DEFAULT_GROUP_SIZE, DefaultModelError, ensure_awq_default, ensure_fp16_default
from tinyserve_quantize.evaluate import DEFAULT_CTX, DEFAULT_MAX_TOKENS, evaluate_folder, perplexity, text_ids
from tinyserve_quantize.model_families import family_for
from tinyserve_quantize.model_io import load_model, load_tokenizer, read_config
from tinyserve_quantize.pipeline import USER_ERRORS, log_stderr
from tinyserve_quantize.quantizer import QuantSpec
from tinyserve_quantize.report import JSON_FILE
from tinyserve_quantize.text_data import eval_text

AUTOAWQ_REFERENCE = 38.04  # AutoAWQ 0.2.9 under the same protocol, from FACTS.md (not re-run here)


def rtn_perplexity(fp16_dir, spec: QuantSpec, max_tokens: int) -> float:
    model = load_model(fp16_dir)
    family = family_for(read_config(fp16_dir))
    dequantize_into(model, rtn_quantize(model, family, spec, progress=False), spec.group_size)
    ppl, _ = perplexity(model, text_ids(load_tokenizer(fp16_dir), eval_text(), max_tokens), DEFAULT_CTX)
    return ppl


def main(as_json: bool = False, max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    log = log_stderr
    fp16_dir = ensure_fp16_default(log)
    awq_dir = ensure_awq_default(log)
    report = json.loads((awq_dir / JSON_FILE).read_text())["summary"]
    log("evaluating fp16, RTN and AWQ (about half a minute each)")
    fp16 = evaluate_folder(fp16_dir, max_tokens=max_tokens)
    rtn = rtn_perplexity(fp16_dir, QuantSpec(4, DEFAULT_GROUP_SIZE), max_tokens)
    awq = evaluate_folder(awq_dir, max_tokens=max_tokens)
    result = {
        "model": fp16_dir.name, "tokens": fp16["tokens"], "fp16": fp16["ppl"], "rtn": rtn, "awq": awq["ppl"],
        "awq_recovers": (rtn - awq["ppl"]) / (rtn - fp16["ppl"]),
        "awq_quantize_seconds": report["quantize_seconds"], "awq_peak_rss_gib": report["peak_rss_gib"],
        "awq_folder": str(awq_dir),
    }
    if as_json:
        print(json.dumps(result))
        return result
    print(f"SmolLM2-135M-Instruct, w4 g{DEFAULT_GROUP_SIZE}: perplexity on Botchan ch. I-IV ({fp16['tokens']} predicted tokens, ctx {DEFAULT_CTX})")
    print("| weights | perplexity | vs fp16 |")
    print("|---|---:|---:|")
    for name, ppl in (("fp16", fp16["ppl"]), ("RTN w4", rtn), ("AWQ w4 (tinyserve)", awq["ppl"])):
        print(f"| {name} | {ppl:.2f} | {ppl - fp16['ppl']:+.2f} |")
    print(f"| AutoAWQ 0.2.9 w4 (FACTS.md, not re-run) | {AUTOAWQ_REFERENCE:.2f} | {AUTOAWQ_REFERENCE - fp16['ppl']:+.2f} |")
    print(f"AWQ recovers {100 * result['awq_recovers']:.0f}% of RTN's loss; quantized in {report['quantize_seconds']:.0f} s "
          f"(peak RSS {report['peak_rss_gib']:.2f} GiB) into {awq_dir}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m tinyserve_quantize.table", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="evaluation tokens (default 16384)")
    a = p.parse_args()
    try:
        main(a.json, a.max_tokens)
    except (*USER_ERRORS, DefaultModelError) as e:
        sys.exit(f"tinyserve_quantize.table: error: {e}")
