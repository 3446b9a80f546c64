"""Token-level perplexity of a model folder (fp16/bf16/fp32, or our packed AWQ format) on a text.

    python -m tinyserve_quantize.evaluate --model DIR [--text FILE] [--ctx 512] [--max-tokens 16384] [--json]

The text is tokenized without BOS, cut to its first max-tokens tokens, and split into non-overlapping windows of ctx
tokens (a shorter last window is kept); every token after the first of its window is predicted, so perplexity is
exp(total NLL / predicted tokens). Compute is fp32. Without --text, the built-in evaluation slice (Botchan chapters
I-IV) is used: with the defaults this is the protocol of the reference numbers in FACTS.md.

A packed folder is dequantized with the reference functions of tinyserve_kernels.layout into an fp32 transformers model.
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tinyserve_quantize.model_io import ModelFolderError, load_model, load_tokenizer
from tinyserve_quantize.text_data import eval_text, read_user_text

DEFAULT_CTX = 512
DEFAULT_MAX_TOKENS = 16384


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, ctx: int = DEFAULT_CTX, batch: int = 2, progress: bool = False) -> tuple[float, int]:
    """ids [T] -> (perplexity, predicted tokens) over non-overlapping windows of ctx tokens."""
    windows = [ids[i : i + ctx] for i in range(0, len(ids), ctx)]
    windows = [w for w in windows if len(w) > 1]
    nll, count = 0.0, 0
    full = [w for w in windows if len(w) == ctx]
    rest = [w for w in windows if len(w) != ctx]
    batches = [torch.stack(full[i : i + batch]) for i in range(0, len(full), batch)] + [w[None] for w in rest]
    for x in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        logits = model(input_ids=x, use_cache=False).logits.float()  # [b, S, V]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / count), count


def text_ids(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids[:max_tokens] if max_tokens else ids)


@dataclass
class EvalConfig:
    model: Path
    text: Path | None = None
    ctx: int = DEFAULT_CTX
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    json: bool = False

    def __post_init__(self):
        if self.ctx < 2:
            raise ValueError("--ctx must be at least 2")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError("--max-tokens must be at least 2")


def evaluate_folder(folder: Path, text: str | None = None, ctx: int = DEFAULT_CTX, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> dict:
    model = load_model(folder)
    ids = text_ids(load_tokenizer(folder), eval_text() if text is None else text, max_tokens)
    if len(ids) < 2:
        raise ModelFolderError("the text has fewer than 2 tokens")
    t0 = time.perf_counter()
    ppl, tokens = perplexity(model, ids, ctx)
    return {"model": str(folder), "ppl": ppl, "tokens": tokens, "ctx": ctx, "seconds": round(time.perf_counter() - t0, 1)}


def main(cfg: EvalConfig) -> dict:
    text = None
    if cfg.text is not None:
        text = read_user_text(cfg.text, "text file", ModelFolderError)
    result = evaluate_folder(cfg.model, text, cfg.ctx, cfg.max_tokens)
    if cfg.json:
        print(json.dumps(result))
    else:
        print(f"{cfg.model}: perplexity {result['ppl']:.2f} over {result['tokens']} predicted tokens (ctx {cfg.ctx}, {result['seconds']} s)")
    return result


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m tinyserve_quantize.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model folder (fp16/bf16/fp32 or packed AWQ)")
    p.add_argument("--text", type=Path, help="UTF-8 text file (default: the built-in evaluation slice)")
    p.add_argument("--ctx", type=int, default=DEFAULT_CTX, help="window length in tokens (default 512)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="use the text's first N tokens (default 16384; 0: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ppl and tokens")
    a = p.parse_args(argv)
    try:
        return EvalConfig(a.model, a.text, a.ctx, a.max_tokens or None, a.json)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_args()
    try:
        main(cfg)
    except ModelFolderError as e:
        sys.exit(f"tinyserve_quantize.evaluate: error: {e}")
