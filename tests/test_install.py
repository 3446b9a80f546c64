"""The install cannot shadow or be shadowed: our import names are ours alone, and transformers' model code runs in the
same process as our kernels.

transformers 5.25 depends on Hugging Face's `kernels` distribution and imports it whenever a model config loads; our
kernels package was once called `kernels` too and broke every command (README, "Layout").
"""

import importlib.metadata as md
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OURS = "tinyserve"  # our distribution's name


def our_import_names() -> set[str]:
    """Every top-level package in the checkout (what `python -m` from the repo root can import) and every top-level
    name our installed distribution maps."""
    names = {p.parent.name for p in REPO.glob("*/__init__.py")}
    names |= {name for name, dists in md.packages_distributions().items() if OURS in dists}
    return names


def test_no_other_distribution_provides_our_import_names():
    names = our_import_names()
    assert {"tinyserve", "tinyserve_kernels", "tinyserve_quantize"} <= names
    clashes = {name: [d for d in dists if d != OURS]
               for name, dists in md.packages_distributions().items() if name in names and set(dists) - {OURS}}
    assert not clashes, f"top-level names also provided by other installed distributions: {clashes}"


def test_our_packages_are_imported_from_this_checkout():
    for name in ("tinyserve", "tinyserve_kernels", "tinyserve_quantize"):
        origin = Path(importlib.util.find_spec(name).origin).resolve()
        assert origin.is_relative_to(REPO), f"{name} is imported from {origin}, not from this checkout"


def test_transformers_model_code_runs_beside_our_kernels():
    """In one fresh process, from the repo root (as `python -m` runs): our kernels and the layout first, then
    transformers' config loading (which imports its hub-kernels integration) and a Llama forward pass."""
    code = """
import torch
from tinyserve_kernels import dispatch
from tinyserve_kernels.layout import dequantize, pack_linear
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.integrations import hub_kernels  # imports Hugging Face's `kernels` where it is installed
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1)
model = LlamaForCausalLM(config).eval()
logits = model(input_ids=torch.arange(8)[None]).logits
assert logits.shape == (1, 8, 64), logits.shape
x = torch.randn(3, 64, dtype=torch.bfloat16)  # [M, K]
codes = torch.randint(0, 16, (16, 64), dtype=torch.int32)  # [N, K]
zeros, steps = torch.full((16, 2), 8, dtype=torch.int32), torch.full((16, 2), 0.01).half()  # [N, K // G]
qweight, qzeros, scales = pack_linear(codes, zeros, steps)
w = dispatch.prepare(qweight, qzeros, scales, 32)
ref = x.float() @ dequantize(qweight, qzeros, scales, 32).float()  # [M, N]
torch.testing.assert_close(dispatch.int4_linear(x, w).float(), ref, rtol=0.02, atol=0.02)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert torch.__version__  # the parent process imported torch too: the child is the fresh one
