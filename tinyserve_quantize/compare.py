"""python -m tinyserve_quantize.compare: RTN vs GPTQ vs AWQ (vs AWQ + GPTQ) on one model and one text, in one command.

    python -m tinyserve_quantize.compare [--model DIR] [--text FILE] [--methods fp16,rtn,gptq,awq,awq-gptq,awq-gptq-attn] [--w-bit 4]
                               [--group-size 64] [--ctx 512] [--max-tokens 16384] [--json] [--out DIR]
                               [--calib-text FILE] [--n-samples 128] [--seqlen 512] [--[no-]act-order] [--also-text FILE ...]

Each method runs in its own process, one after another: it loads the model, quantizes it in memory (fake
quantization: the dequantized weights are bit-identical to what `python -m tinyserve_quantize` would pack), and evaluates
perplexity on the same held-out tokens as every other method (tinyserve_quantize.evaluate's protocol). One process per method
gives each its own peak memory and keeps a failure (an error, a crash, memory exhaustion) to its own row. The
processes are forked from a server process that has imported torch and transformers once, so each starts at once.

Prints one table: method, perplexity, difference to fp16, share of RTN's perplexity increase recovered, quantization
wall time (calibration included, model loading and evaluation excluded) and peak RSS of the process up to the end of
quantization. `--also-text FILE` (repeatable) evaluates every method's model on more texts in the same process (two
more columns each: perplexity and RTN's loss recovered), so a second held-out text costs no second quantization.
Writes the same as compare.json and a bar chart compare.png into --out (default:
./compare-<model>-w<bits>-g<group>). Without --model, the embedded default model (SmolLM2-135M-Instruct) is used;
without --text, the built-in evaluation slice (Botchan chapters I-IV); calibration defaults to the built-in slice
(chapters V-XI), disjoint from it.
"""

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from tinyserve_quantize.awq import native_compute_dtype
from tinyserve_quantize.default_model import DefaultModelError
from tinyserve_quantize.evaluate import DEFAULT_CTX, DEFAULT_MAX_TOKENS
from tinyserve_quantize.gptq import GPTQConfig
from tinyserve_quantize.methods import CALIBRATED, METHODS
from tinyserve_quantize.model_io import ModelFolderError, awq_config, config_dtype, read_config, weight_files
from tinyserve_quantize.pipeline import USER_ERRORS
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec
from tinyserve_quantize.text_data import read_user_text

COMPARE_METHODS = ("fp16", *METHODS)
DEFAULT_METHODS = ("fp16", "rtn", "gptq", "awq", "awq-gptq", "awq-gptq-attn")
JSON_NAME, PNG_NAME = "compare.json", "compare.png"


class CompareError(ValueError):
    """A user mistake in the comparison's settings; the message says which."""


@dataclass
class CompareConfig:
    model: Path | None = None  # None: the embedded default model
    text: Path | None = None  # None: the built-in evaluation slice
    methods: tuple[str, ...] = DEFAULT_METHODS
    w_bit: int = 4
    group_size: int = 64
    ctx: int = DEFAULT_CTX
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    json: bool = False
    out: Path | None = None
    calib_text: Path | None = None  # None: the built-in calibration slice
    n_samples: int = 128
    seqlen: int = 512
    act_order: bool | None = None  # None: each method's default (GPTQConfig.resolved)
    also_texts: tuple[Path, ...] = ()  # more evaluation texts, each a column pair of the table
    fp32: bool = False  # calibrate in fp32 even where bf16 is native (awq.native_compute_dtype)

    def __post_init__(self):
        if isinstance(self.methods, str):
            self.methods = tuple(m.strip() for m in self.methods.split(",") if m.strip())
        unknown = [m for m in self.methods if m not in COMPARE_METHODS]
        if unknown:
            raise CompareError(f"unknown method {unknown[0]!r}; choose from {','.join(COMPARE_METHODS)}")
        if not self.methods:
            raise CompareError("--methods is empty")
        self.methods = tuple(dict.fromkeys(self.methods))  # drop repeats, keep the order
        if self.ctx < 2:
            raise CompareError("--ctx must be at least 2")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise CompareError("--max-tokens must be at least 2")
        if self.n_samples < 1 or self.seqlen < 2:
            raise CompareError("--n-samples must be at least 1 and --seqlen at least 2")
        self.spec = QuantSpec(self.w_bit, self.group_size)
        for name in ("text", "calib_text"):  # read once here so a bad file fails before any method runs
            path = getattr(self, name)
            if path is not None:
                read_user_text(Path(path), "--" + name.replace("_", "-"), CompareError)
        self.also_texts = tuple(Path(t) for t in self.also_texts)
        for path in self.also_texts:
            read_user_text(path, "--also-text", CompareError)


def check_model_folder(folder: Path, spec: QuantSpec) -> dict:
    """Fail before any method runs when the folder cannot be read or the settings cannot fit its linears."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinyserve_quantize.awq import check_model
    from tinyserve_quantize.model_families import family_for

    config = read_config(folder)
    family = family_for(config)
    if awq_config(config) is not None:
        raise ModelFolderError(f"{folder} is already quantized; compare methods on an fp16, bf16 or fp32 model")
    config_dtype(config)
    weight_files(folder)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ModelFolderError(f"cannot load {folder}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):  # shapes only, no memory
        check_model(AutoModelForCausalLM.from_config(hf_config), family, spec)
    return config


PRELOAD = ["torch", "transformers", "tinyserve_quantize.methods", "tinyserve_quantize.evaluate", "tinyserve_quantize.model_io"]


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM: the peak of its own address space, not the fork server's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_method(method: str, cfg: CompareConfig, model_dir: Path) -> dict:
    """Load, quantize (fake) and evaluate one method in this process. Returns its row."""
    import torch
    import transformers

    from tinyserve_quantize.awq import SearchConfig, dequantize_into
    from tinyserve_quantize.calibration import calibration_windows
    from tinyserve_quantize.evaluate import perplexity, text_ids
    from tinyserve_quantize.methods import quantize_model
    from tinyserve_quantize.model_families import family_for
    from tinyserve_quantize.model_io import load_model, load_tokenizer
    from tinyserve_quantize.text_data import calib_text, eval_text

    transformers.utils.logging.disable_progress_bar()
    load_start = os.getloadavg()[0]
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    family = family_for(read_config(model_dir))
    t0 = time.perf_counter()
    if method != "fp16":
        windows = None
        if method in CALIBRATED:
            text = read_user_text(cfg.calib_text, "--calib-text", CompareError) if cfg.calib_text else calib_text()
            windows = calibration_windows(tokenizer, text, cfg.n_samples, cfg.seqlen,
                                          log=lambda m: print(f"{method}: {m}", file=sys.stderr))
        search = SearchConfig(compute_dtype=torch.float32) if cfg.fp32 else SearchConfig()
        result = quantize_model(method, model, family, cfg.spec, windows, search, gptq=GPTQConfig(act_order=cfg.act_order),
                                log=lambda m: None)
        dequantize_into(model, result, cfg.spec.group_size)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    text = read_user_text(cfg.text, "--text", CompareError) if cfg.text else eval_text()
    ids = text_ids(tokenizer, text, cfg.max_tokens)
    if len(ids) < 2:
        raise ModelFolderError("the evaluation text has fewer than 2 tokens")
    ppl, tokens = perplexity(model, ids, cfg.ctx, progress=True)
    more = []
    for path in cfg.also_texts:
        extra_ids = text_ids(tokenizer, read_user_text(path, "--also-text", CompareError), cfg.max_tokens)
        if len(extra_ids) < 2:
            raise ModelFolderError(f"{path} has fewer than 2 tokens")
        extra_ppl, extra_tokens = perplexity(model, extra_ids, cfg.ctx, progress=True)
        more.append({"text": str(path), "ppl": extra_ppl, "tokens": extra_tokens})
    return {
        "method": method, "ppl": ppl, "tokens": tokens, "also": more,
        "quantize_seconds": None if method == "fp16" else round(seconds, 1),
        "peak_rss_gib": round(peak, 2), "threads": torch.get_num_threads(),
        "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2), "error": None,
    }


def _child(method: str, cfg: CompareConfig, model_dir: Path, conn) -> None:
    try:
        row = run_method(method, cfg, model_dir)
    except (*USER_ERRORS, CompareError) as e:
        row = {"method": method, "error": str(e)}
    except KeyboardInterrupt:
        return
    except Exception as e:  # a bug or a resource failure: the row carries it, the other methods go on
        row = {"method": method, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    conn.send(row)
    conn.close()


def run_isolated(method: str, cfg: CompareConfig, model_dir: Path) -> dict:
    """run_method in a fresh process; one that dies without an answer becomes an error row.

    "forkserver": children are forked from a clean server process that has only imported the modules in PRELOAD and
    never run a parallel torch op (forking a process whose OpenMP pool is running is unsafe)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(method, cfg, model_dir, send), name=f"compare-{method}")
    proc.start()
    send.close()
    try:
        row = recv.recv()
    except EOFError:
        proc.join()
        return {"method": method, "error": f"the worker process died (exit code {proc.exitcode})"}
    except KeyboardInterrupt:
        proc.terminate()
        proc.join()
        raise
    proc.join()
    return row


def _recovered(rows: list[dict], ppl_of) -> dict[str, float | None]:
    """method -> the share of RTN's perplexity increase over fp16 it recovers (None where undefined)."""
    ok = {r["method"]: ppl_of(r) for r in rows if not r.get("error")}
    fp16, rtn = ok.get("fp16"), ok.get("rtn")
    gap = None if fp16 is None or rtn is None else rtn - fp16
    return {m: None if not gap or m == "fp16" else (rtn - p) / gap for m, p in ok.items()}


def summarize(rows: list[dict]) -> None:
    """Add the difference to fp16 and the share of RTN's increase recovered, where those rows succeeded (on every
    text)."""
    fp16 = next((r["ppl"] for r in rows if r["method"] == "fp16" and not r.get("error")), None)
    recovered = _recovered(rows, lambda r: r["ppl"])
    for r in rows:
        if r.get("error"):
            continue
        r["delta_fp16"] = None if fp16 is None else r["ppl"] - fp16
        r["rtn_recovered"] = recovered[r["method"]]
    for i in range(len(next((r["also"] for r in rows if not r.get("error")), []))):
        recovered = _recovered(rows, lambda r: r["also"][i]["ppl"])
        for r in rows:
            if not r.get("error"):
                r["also"][i]["rtn_recovered"] = recovered[r["method"]]


def table(result: dict) -> str:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    def rec(v):
        return "" if v is None else f"{100 * v:.0f}%"

    also = [Path(t).name for t in result.get("also_texts", [])]
    head = "".join(f" {name} perplexity | recovered |" for name in also)
    lines = [result["title"],
             f"| method | perplexity | vs fp16 | RTN's loss recovered |{head} quantize s | peak RSS GiB |",
             "|---|---:|---:|---:|" + "---:|---:|" * len(also) + "---:|---:|"]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['method']} | failed: {r['error']} | | |" + " | |" * len(also) + " | |")
            continue
        cells = "".join(f" {a['ppl']:.2f} | {rec(a.get('rtn_recovered'))} |" for a in r.get("also", []))
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {num(r.get('delta_fp16'), '+.2f')} | {rec(r.get('rtn_recovered'))} |"
                     f"{cells} {num(r['quantize_seconds'], '.1f')} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Two bar charts side by side: perplexity (fp16 as a dashed line) and quantization time, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["method"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    ppl = [0 if r.get("error") else r["ppl"] for r in rows]
    bars = ax1.bar(names, ppl, color=["#999999" if n == "fp16" else "#4878cf" for n in names])
    for bar, r in zip(bars, rows):
        label = "failed" if r.get("error") else f"{r['ppl']:.2f}"
        ax1.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    fp16 = next((r["ppl"] for r in rows if r["method"] == "fp16" and not r.get("error")), None)
    ok = [p for p in ppl if p]
    if ok:
        low = min(ok + ([fp16] if fp16 else []))
        ax1.set_ylim(0.9 * low, 1.05 * max(ok))
    if fp16:
        ax1.axhline(fp16, ls="--", c="k", lw=0.8, label="fp16")
        ax1.legend(loc="upper right")
    ax1.set_ylabel("perplexity (lower is better)")
    ax1.set_title("held-out perplexity")
    secs = [0 if r.get("error") or r.get("quantize_seconds") is None else r["quantize_seconds"] for r in rows]
    bars = ax2.bar(names, secs, color="#6acc65")
    for bar, r in zip(bars, rows):
        seconds = r.get("quantize_seconds")
        label = "failed" if r.get("error") else ("" if seconds is None else f"{seconds:.0f} s")
        ax2.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("seconds")
    ax2.set_title("quantization wall time")
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(cfg: CompareConfig, log=log_stderr) -> dict:
    if cfg.model is None:
        from tinyserve_quantize.default_model import ensure_fp16_default

        model_dir = ensure_fp16_default(log)
    else:
        model_dir = Path(cfg.model)
    check_model_folder(model_dir, cfg.spec)
    out = Path(cfg.out) if cfg.out else Path(f"compare-{model_dir.name}-w{cfg.w_bit}-g{cfg.group_size}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, method in enumerate(cfg.methods, 1):
        log(f"compare: [{n}/{len(cfg.methods)}] {method}")
        row = run_isolated(method, cfg, model_dir)
        if row.get("error"):
            log(f"compare: {method} failed: {row['error']}")
        else:
            took = "" if row["quantize_seconds"] is None else f", quantized in {row['quantize_seconds']:.1f} s"
            log(f"compare: {method}: perplexity {row['ppl']:.2f}{took}, peak RSS {row['peak_rss_gib']:.2f} GiB")
        rows.append(row)
    summarize(rows)
    tokens = next((r["tokens"] for r in rows if not r.get("error")), None)
    text = str(cfg.text) if cfg.text else "built-in Botchan chapters I-IV"
    calib = str(cfg.calib_text) if cfg.calib_text else "built-in Botchan chapters V-XI"
    compute = "float32" if cfg.fp32 else str(native_compute_dtype()).removeprefix("torch.")
    fp32_methods = [m for m in cfg.methods if "gptq" in m and GPTQConfig().resolved(m).fp32]
    calibrated = compute if compute == "float32" or not fp32_methods else f"{compute}; {', '.join(fp32_methods)} in float32"
    result = {
        "title": f"{model_dir.name}, w{cfg.w_bit} g{cfg.group_size}: perplexity on {text} "
                 f"({tokens} predicted tokens, ctx {cfg.ctx}; calibrated in {calibrated})",
        "model": str(model_dir), "text": text, "also_texts": [str(t) for t in cfg.also_texts],
        "calibration": {"text": calib, "n_samples": cfg.n_samples, "seqlen": cfg.seqlen},
        "w_bit": cfg.w_bit, "group_size": cfg.group_size, "ctx": cfg.ctx, "max_tokens": cfg.max_tokens,
        "tokens": tokens,
        "act_order": cfg.act_order,
        "compute_dtype": compute,
        "gptq": {m: asdict(GPTQConfig(act_order=cfg.act_order).resolved(m)) for m in cfg.methods if "gptq" in m},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
    }
    _write_atomic(out / JSON_NAME, lambda p: p.write_text(json.dumps(result, indent=1) + "\n"))
    _write_atomic(out / PNG_NAME, lambda p: plot(result, p))
    log(f"compare: wrote {out / JSON_NAME} and {out / PNG_NAME}")
    print(json.dumps(result) if cfg.json else table(result), flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    p = argparse.ArgumentParser(prog="python -m tinyserve_quantize.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="fp16/bf16/fp32 model folder (default: the embedded SmolLM2)")
    p.add_argument("--text", type=Path, help="UTF-8 evaluation text (default: the built-in evaluation slice)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {','.join(COMPARE_METHODS)} (default: all)")
    p.add_argument("--w-bit", type=int, default=4, help="weight bits: 4 (default) or 3")
    p.add_argument("--group-size", type=int, default=64, help="input channels per quantization group (default 64)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help="evaluation window in tokens (default 512)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="evaluate the text's first N tokens (default 16384; 0: all)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of the table")
    p.add_argument("--out", type=Path,
                   help="folder for compare.json and compare.png (default ./compare-<model>-w<bits>-g<group>)")
    p.add_argument("--calib-text", type=Path, help="UTF-8 calibration text (default: the built-in calibration slice)")
    p.add_argument("--n-samples", type=int, default=128,
                   help="calibration windows (default 128; a shorter text gives fewer)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction,
                   help="GPTQ visits columns by decreasing Hessian diagonal (default: on for awq-gptq-attn, off for the others)")
    p.add_argument("--also-text", type=Path, action="append", default=[],
                   help="another UTF-8 evaluation text, evaluated on the same quantized models (repeatable)")
    p.add_argument("--fp32", action="store_true",
                   help="calibrate in fp32 (default: bf16 where the CPU or GPU computes it natively, fp32 on an AVX2-only CPU)")
    a = p.parse_args(argv)
    try:
        return CompareConfig(a.model, a.text, a.methods, a.w_bit, a.group_size, a.ctx, a.max_tokens or None, a.json,
                             a.out, a.calib_text, a.n_samples, a.seqlen, a.act_order, tuple(a.also_text),
                             a.fp32)
    except (CompareError, QuantizationError) as e:
        p.error(str(e))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_args()
    try:
        main(cfg)
    except (*USER_ERRORS, CompareError, DefaultModelError) as e:
        sys.exit(f"tinyserve_quantize.compare: error: {e}")
    except KeyboardInterrupt:
        sys.exit("tinyserve_quantize.compare: interrupted")
