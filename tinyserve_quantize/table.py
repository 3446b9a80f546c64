"""python -m tinyserve_quantize.table: the default model's candidate recipes side by side, by what a user sees.

    python -m tinyserve_quantize.table [--recipes default|all|NAME,...] [--max-tokens 16384] [--speed-rounds 3] [--json]
                                       [--save FILE]

For fp16 and each recipe (default_model.RECIPES; each quantized once and cached under $TINYSERVE_HOME, as the
runtime's default folder is): the quantization's time and peak memory (from its report), perplexity on the built-in
evaluation slice (Botchan chapters I-IV, first 16,384 tokens, 512-token windows, fp32: evaluate.py's protocol), chat
agreement with the unquantized model on the 50 built-in instructions (top-1 over the first 32 answer tokens, and
first-line match; agreement.py), and the runtime's batch-1 decode speed (`python -m tinyserve generate`, 256 tokens
after a short prompt, run as a separate program: the quantizer does not import the runtime; the folders take turns,
and each reports its best of --speed-rounds runs, as `python -m tinyserve bench` does on these noisy machines).
"""

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
from pathlib import Path

from tinyserve_quantize.agreement import agreement, reference_answers
from tinyserve_quantize.default_model import (
    DEFAULT_NAME,
    DEFAULT_RECIPE,
    RECIPES,
    DefaultModelError,
    ensure_fp16_default,
    ensure_quantized_default,
    quantized_folder,
)
from tinyserve_quantize.evaluate import DEFAULT_CTX, DEFAULT_MAX_TOKENS, evaluate_folder
from tinyserve_quantize.model_io import load_model, load_tokenizer
from tinyserve_quantize.pipeline import USER_ERRORS, log_stderr
from tinyserve_quantize.report import JSON_FILE

SPEED_PROMPT = "The history of the city begins"
SPEED_TOKENS = 256


class TableError(ValueError):
    """A bad --recipes value; the message lists the known ones."""


def pick_recipes(spec: str) -> list[str]:
    if spec == "all":
        return list(RECIPES)
    if spec == "default":
        return [DEFAULT_RECIPE.name]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        bad = unknown[0] if unknown else spec
        raise TableError(f"unknown recipe {bad!r}; choose from default, all, {', '.join(RECIPES)}")
    return names


def cpu_name() -> str:
    """The CPU's model name, and whether it has AMX (which speeds up the quantizer's bf16 products)."""
    name, amx = platform.machine(), False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == platform.machine():
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                amx = "amx_tile" in line.split()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {'AMX' if amx else 'no AMX'}"


def decode_tok_s(folder: Path) -> float:
    """One `python -m tinyserve generate` run on the folder: its decode tokens/s."""
    cmd = [sys.executable, "-m", "tinyserve", "generate", "--model", str(folder), "--prompt", SPEED_PROMPT,
           "--max-tokens", str(SPEED_TOKENS), "--ignore-eos", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return float(json.loads(r.stdout)["decode_tok_s"])


def quantized(name: str) -> Path:
    """The recipe's cached folder, quantized first if needed in a process of its own: its report's time and peak
    memory are then the quantization's alone, not this process's after the recipes before it."""
    folder = quantized_folder(RECIPES[name])
    if not (folder / JSON_FILE).is_file():
        proc = multiprocessing.get_context("spawn").Process(target=ensure_quantized_default, args=(RECIPES[name],))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise DefaultModelError(f"quantizing the recipe {name} failed (exit status {proc.exitcode})")
    return ensure_quantized_default(RECIPES[name])


def main(names: list[str], max_tokens: int = DEFAULT_MAX_TOKENS, speed_rounds: int = 3, as_json: bool = False,
         save: Path | None = None) -> dict:
    log = log_stderr
    fp16_dir = ensure_fp16_default(log)
    folders = {name: quantized(name) for name in names}
    rows = {"fp16": {"folder": str(fp16_dir)}}
    for name, folder in folders.items():
        summary = json.loads((folder / JSON_FILE).read_text())["summary"]
        rows[name] = {"folder": str(folder), "quantize_s": summary["quantize_seconds"],
                      "peak_rss_gib": summary["peak_rss_gib"],
                      "calib_tokens": (summary.get("calibration") or {}).get("tokens", 0)}

    log(f"perplexity of fp16 and {len(names)} recipe(s) (about 40 s each)")
    for name, row in rows.items():
        result = evaluate_folder(Path(row["folder"]), max_tokens=max_tokens)
        row["ppl"], tokens = result["ppl"], result["tokens"]

    log("chat agreement with fp16 on the built-in instructions (about a minute each)")
    tok = load_tokenizer(fp16_dir)
    ref = reference_answers(load_model(fp16_dir), tok)
    rows["fp16"].update(top1=1.0, first_line=1.0)
    for name in names:
        result = agreement(load_model(folders[name]), tok, ref)
        rows[name].update(top1=result["top1"], first_line=result["first_line"], answers=result["answers"])

    if speed_rounds:
        log(f"decode speed: {speed_rounds} round(s) of `python -m tinyserve generate`, the folders taking turns")
        speeds = {name: [] for name in rows}
        for _ in range(speed_rounds):
            for name, row in rows.items():
                speeds[name].append(decode_tok_s(Path(row["folder"])))
        for name, runs in speeds.items():
            rows[name]["decode_tok_s"] = max(runs)

    result = {"model": DEFAULT_NAME, "default": DEFAULT_RECIPE.name, "eval_tokens": tokens,
              "instructions": len(ref.instructions),
              "cpu": cpu_name(), "rows": rows}
    if save is not None:
        save.write_text(json.dumps(result, indent=1) + "\n")
    if as_json:
        print(json.dumps(result))
        return result
    print(f"{DEFAULT_NAME}: perplexity on Botchan ch. I-IV ({tokens} predicted tokens, ctx {DEFAULT_CTX}); chat "
          f"agreement with fp16 on {len(ref.instructions)} instructions (greedy); batch-1 decode of {SPEED_TOKENS} "
          f"tokens; {result['cpu']}")
    print("| weights | perplexity | vs fp16 | top-1 agreement | first line same | decode tok/s | quantize s "
          "| peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    fp = rows["fp16"]["ppl"]
    for name, row in rows.items():
        label = f"**{name}** (default)" if name == DEFAULT_RECIPE.name else name
        speed = f"{row['decode_tok_s']:.0f}" if "decode_tok_s" in row else ""
        cost = f"{row['quantize_s']:.0f} | {row['peak_rss_gib']:.2f}" if "quantize_s" in row else " | "
        print(f"| {label} | {row['ppl']:.2f} | {row['ppl'] - fp:+.2f} | {100 * row['top1']:.1f}% | "
              f"{100 * row['first_line']:.0f}% | "
              f"{speed} | {cost} |")
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m tinyserve_quantize.table", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="all",
                   help=f"default, all (the default) or a comma-separated list of: {', '.join(RECIPES)}")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="evaluation tokens (default 16384)")
    p.add_argument("--speed-rounds", type=int, default=3,
                   help="decode runs per folder, the best counts (default 3; 0: no speed column)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--save", type=Path,
                   help="also write the JSON object (with every instruction's first lines) to this file")
    a = p.parse_args()
    if a.max_tokens < 2 or a.speed_rounds < 0:
        p.error("--max-tokens must be at least 2 and --speed-rounds at least 0")
    try:
        main(pick_recipes(a.recipes), a.max_tokens, a.speed_rounds, a.json, a.save)
    except (*USER_ERRORS, DefaultModelError, TableError) as e:
        sys.exit(f"tinyserve_quantize.table: error: {e}")
    except KeyboardInterrupt:
        sys.exit("tinyserve_quantize.table: interrupted (finished quantizations stay cached)")
