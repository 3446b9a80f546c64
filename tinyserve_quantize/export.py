"""Writing a quantized model folder, atomically.

Packed folder (the AutoAWQ "GEMM" layout of tinyserve_kernels.layout):
    model.safetensors   every decoder linear as <name>.qweight / .qzeros / .scales (+ .bias), everything else fp16
    config.json         the source config + "quantization_config" (quant_method awq, bits, group_size, zero_point,
                        version gemm, modules_to_not_convert null) and dtype float16
    tokenizer files, chat template, generation_config.json: copied from the source folder
    quantization_report.json / .png: see report.py
Fake-quant folder (--fake): the same model as plain fp16 weights (quantize-dequantized), no quantization_config.

Everything is written to a temporary folder beside the target and renamed into place at the end, so a failure or an
interrupt never leaves a half-written model under the target name.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinyserve_kernels.layout import dequantize
from tinyserve_quantize.awq import QuantResult
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec

WEIGHTS_FILE = "model.safetensors"
NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # weights are written, never copied
NOT_COPIED_NAMES = ("config.json", "model.safetensors.index.json", "quantization_report.json", "quantization_report.png")


def quantization_config(spec: QuantSpec) -> dict:
    return {
        "quant_method": "awq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def state_dict(model: torch.nn.Module, result: QuantResult, spec: QuantSpec, fake: bool, tied: bool) -> dict[str, torch.Tensor]:
    """The tensors to save: packed (or dequantized, when fake) decoder linears, every other parameter in fp16."""
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        prefix = key.rsplit(".", 1)[0]
        if prefix in result.linears or (tied and key == "lm_head.weight"):
            continue  # quantized below / shares the embedding's storage
        out[key] = t.detach().to(torch.float16).contiguous()
    for name, p in result.linears.items():
        if fake:
            out[f"{name}.weight"] = dequantize(p.qweight, p.qzeros, p.scales, spec.group_size).t().contiguous()
        else:
            out[f"{name}.qweight"], out[f"{name}.qzeros"], out[f"{name}.scales"] = p.qweight, p.qzeros, p.scales
        if p.bias is not None:
            out[f"{name}.bias"] = p.bias.contiguous()
    for key, t in out.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise QuantizationError(f"{key} does not fit in fp16 after quantization (non-finite values)")
    return out


def output_config(src_config: dict, spec: QuantSpec, fake: bool) -> dict:
    config = {k: v for k, v in src_config.items() if k not in ("quantization_config", "torch_dtype")}
    config["dtype"] = "float16"
    if not fake:
        config["quantization_config"] = quantization_config(spec)
    return config


def write_folder(
    out: Path,
    src: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    extra: Callable[[Path], None] | None = None,
    if_exists: str = "error",
) -> bool:
    """Write the folder atomically. extra(tmp_dir) may add files (the report). if_exists: "error" refuses an existing
    `out`, "replace" swaps it out only once the new folder is complete, "keep" leaves an existing one (another
    process finished first) and discards ours. Returns whether `out` is now the folder written here."""
    out = Path(out)
    if out.exists() and if_exists == "error":
        raise QuantizationError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in sorted(Path(src).iterdir()):
            if f.is_file() and f.name not in NOT_COPIED_NAMES and not f.name.endswith(NOT_COPIED):
                shutil.copy2(f, tmp / f.name)
        if extra is not None:
            extra(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model folder should read like any other
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            if if_exists == "keep":
                shutil.rmtree(tmp)
                return False
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
