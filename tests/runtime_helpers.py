"""Helpers for the runtime tests: write INT4 folders by round-to-nearest (to test the loader and decoder, not the
quantizer), and build the transformers reference whose linears hold exactly our dequantized weights."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinyserve_kernels.layout import dequantize, pack_linear

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> codes [N, K], zeros [N, K // G], scales [N, K // G]: asymmetric min/max per group."""
    N, K = weight.shape
    w = weight.float().view(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-6).half().float()  # rounded to fp16 first: the file stores fp16 scales
    zeros = torch.round(-lo / scales).clamp(0, 15)
    codes = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return codes.view(N, K).int(), zeros.int(), scales


def write_rtn_folder(src: Path, dst: Path, group_size: int = 64, skip: tuple[str, ...] = (), legacy_config: bool = False) -> Path:
    """Copy an fp16 HF folder to dst with every decoder linear (except names containing an entry of `skip`) packed
    as INT4 in the AutoAWQ GEMM layout."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.split(".")[-1] in LINEARS and not any(s in module for s in skip):
            codes, zeros, scales = rtn_quantize(t, group_size)
            qweight, qzeros, qscales = pack_linear(codes, zeros, scales)
            out[f"{module}.qweight"], out[f"{module}.qzeros"], out[f"{module}.scales"] = qweight, qzeros, qscales
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json") and f.is_file():
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    quant = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
             "modules_to_not_convert": list(skip) or None}
    if legacy_config:
        (dst / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"}))
    else:
        config["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def dequantized_reference(quant_dir: Path, fp16_dir: Path, dtype=torch.float32):
    """A transformers model (architecture from fp16_dir) holding every tensor of quant_dir, packed linears
    dequantized with the pure-torch reference: exactly the function our INT4 decoder should compute."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp16_dir, dtype=dtype)
    group_size = json.loads((quant_dir / "config.json").read_text())["quantization_config"]["group_size"]
    tensors = load_file(quant_dir / "model.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if name.endswith(".qweight"):
                module = name.removesuffix(".qweight")
                W = dequantize(t, tensors[f"{module}.qzeros"], tensors[f"{module}.scales"], group_size)  # [K, N]
                params[f"{module}.weight"].copy_(W.t().to(dtype))
            elif name in params:  # norms and embeddings (AWQ may have folded scales into the norms)
                params[name].copy_(t.to(dtype))
    return model
