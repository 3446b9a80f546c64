"""MLP output error of packed INT4 folders against their fp16 model, block by block, on held-out tokens.

    python scripts/mlp_error_diagnosis.py FP16_DIR NAME=PACKED_DIR...

The fp16 model runs the first 2,048 tokens of the built-in evaluation slice (4 windows of 512); its residual stream
at each block's post_attention_layernorm feeds that block's MLP sub-block (norm + gate/up/down) with the fp16 weights
and with each packed folder's (dequantized). Per block and folder, over positions 4..511 of each window: the summed
squared output error relative to the reference's squared norm, the share of that error that is a constant offset
(the mean error vector), and the gain <y, y_ref> / <y_ref, y_ref> (1: no systematic shrinking). Used for the Qwen2
check in BENCHMARKS.md."""
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from tinyserve_kernels.layout import dequantize
from tinyserve_quantize.model_io import load_model, load_tokenizer
from tinyserve_quantize.text_data import eval_text

fp16_dir = sys.argv[1]
folders = dict(a.split("=", 1) for a in sys.argv[2:])
model, tok = load_model(fp16_dir), load_tokenizer(fp16_dir)
ids = torch.tensor(tok(eval_text(), add_special_tokens=False).input_ids[:2048]).view(4, 512)
xs = {}  # block -> [4, 512, H] residual stream entering its MLP sub-block


def capture(i):
    def hook(module, args):
        xs[i] = args[0].detach().clone()

    return hook


hooks = [blk.post_attention_layernorm.register_forward_pre_hook(capture(i)) for i, blk in enumerate(model.model.layers)]
with torch.no_grad():
    model(input_ids=ids, use_cache=False)
for h in hooks:
    h.remove()


def mlp_weights(name: str, i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    G = json.loads((Path(folders[name]) / "config.json").read_text())["quantization_config"]["group_size"]
    with safe_open(Path(folders[name]) / "model.safetensors", "pt") as f:
        w = {"ln": f.get_tensor(p + "post_attention_layernorm.weight").float()}
        for n in ("gate_proj", "up_proj", "down_proj"):
            k = p + "mlp." + n
            w[n] = dequantize(f.get_tensor(k + ".qweight"), f.get_tensor(k + ".qzeros"), f.get_tensor(k + ".scales"), G).float().t()
    return w


def run_mlp(blk, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    ln = blk.post_attention_layernorm
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ln.variance_epsilon) * w["ln"]
    F = torch.nn.functional
    return F.linear(F.silu(F.linear(h, w["gate_proj"])) * F.linear(h, w["up_proj"]), w["down_proj"])


names = list(folders)
print("block | " + " | ".join(f"{n}: err/|ref|^2, bias share of err, gain <y,ref>/<ref,ref>" for n in names) + "  (tokens 4..511 of each window)")
with torch.no_grad():
    for i, blk in enumerate(model.model.layers):
        x = xs[i]
        ref = blk.mlp(blk.post_attention_layernorm(x))
        row = []
        for n in names:
            y = run_mlp(blk, mlp_weights(n, i), x)[:, 4:].flatten(0, 1)  # [T, H]
            r = ref[:, 4:].flatten(0, 1)
            e = y - r
            bias = e.mean(0)
            row.append(f"{e.pow(2).sum() / r.pow(2).sum():.4f} {bias.pow(2).sum() * len(e) / e.pow(2).sum():.3f} {(y * r).sum() / r.pow(2).sum():.4f}")
        print(f"{i:2d} | " + " | ".join(row), flush=True)
