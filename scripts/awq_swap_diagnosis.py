"""Where does AWQ lose to RTN? Swap attention / MLP sub-blocks between an RTN and an AWQ folder of the same model
(each sub-block is self-contained: AWQ folds its scales only into ops inside the same sub-block, the norm included)
and print the perplexity of each mix on the first MAX_TOKENS tokens of the built-in evaluation slice (windows of 512,
tinyserve_quantize.evaluate's protocol), with the mean NLL of each window's first 16 positions apart.

    python scripts/awq_swap_diagnosis.py FP16_DIR RTN_DIR AWQ_DIR MAX_TOKENS VARIANT...

Variants: fp16, rtn, awq, attn (AWQ attention + RTN MLPs), mlp (RTN attention + AWQ MLPs), lo (AWQ in the first half
of the blocks, RTN after), hi (the reverse). Used for the Qwen2 check in BENCHMARKS.md."""

import math
import sys
import time

import torch

from tinyserve_quantize.model_io import load_model, load_tokenizer
from tinyserve_quantize.text_data import eval_text

fp16_dir, rtn_dir, awq_dir = sys.argv[1:4]
max_tokens = int(sys.argv[4])
variants = sys.argv[5:]
model = load_model(fp16_dir)
fp = {k: v.clone() for k, v in model.model.layers.state_dict().items()}
src = {}
for name, folder in (("rtn", rtn_dir), ("awq", awq_dir)):
    m = load_model(folder)
    src[name] = {k: v.clone() for k, v in m.model.layers.state_dict().items()}
    del m
tok = load_tokenizer(fp16_dir)
ids = torch.tensor(tok(eval_text(), add_special_tokens=False).input_ids[:max_tokens])
ctx = 512
windows = ids[: len(ids) // ctx * ctx].view(-1, ctx)
n_layers = len(model.model.layers)


def pick(variant: str, key: str) -> torch.Tensor:
    layer = int(key.split(".")[0])
    attn = "self_attn" in key or "input_layernorm" in key
    if variant == "fp16":
        return fp[key]
    if variant in ("rtn", "awq"):
        return src[variant][key]
    if variant == "attn":  # AWQ attention sub-blocks, RTN MLPs
        return src["awq" if attn else "rtn"][key]
    if variant == "mlp":
        return src["rtn" if attn else "awq"][key]
    if variant == "lo":  # AWQ in the first half of the blocks
        return src["awq" if layer < n_layers // 2 else "rtn"][key]
    if variant == "hi":
        return src["rtn" if layer < n_layers // 2 else "awq"][key]
    raise ValueError(variant)


for v in variants:
    t0 = time.time()
    model.model.layers.load_state_dict({k: pick(v, k) for k in fp})
    nll = []
    with torch.no_grad():
        for i in range(0, len(windows), 2):
            x = windows[i : i + 2]
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll.append(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none"))
    nll = torch.cat(nll)  # [W, ctx - 1]
    print(f"{v:6s} ppl {math.exp(nll.mean()):.2f}  first-16-positions mean nll {nll[:, :16].mean():.3f}  rest {nll[:, 16:].mean():.3f}"
          f"  ({time.time() - t0:.0f} s, {nll.numel()} tokens)", flush=True)
