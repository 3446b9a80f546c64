"""RTN without loading the model: the checkpoint is read one tensor at a time, each decoder linear quantized as it
comes, and written to disk at once (export.ShardWriter), so peak memory is about one tensor in fp32, whatever the
model's size. It writes the same bytes as quantizing the loaded model (methods.py's rtn;
tests/test_quantize_streaming.py). It reads tensor by tensor rather than block by block (blocks.py) because RTN needs
no calibration: no block ever has to run.
"""

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from tinyserve_kernels.checkpoint import Checkpoint
from tinyserve_kernels.layout import pack_linear
from tinyserve_quantize.export import ShardWriter
from tinyserve_quantize.model_families import Family
from tinyserve_quantize.model_io import ModelFolderError
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec, quantize_weight

# Tensors a Llama/Qwen2 *ForCausalLM holds besides the decoder linears; anything else in a checkpoint (e.g. old
# rotary inv_freq buffers) is not a parameter of the model and is not written, as the loaded-model path does not.
KEPT = re.compile(r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
                  r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight")


def stream_rtn(src: Path, tmp: Path, family: Family, spec: QuantSpec, tied: bool, max_shard_bytes: int,
               progress: bool = True) -> list[dict]:
    """Write src's RTN-quantized tensors into the folder tmp; returns the report rows (one per linear)."""
    # Opened per tensor: a multi-GB shard's pages do not pile up (with one handle per file, a 7B model peaked at
    # 10.0 GiB RSS instead of 2.8).
    ck = Checkpoint(src, ModelFolderError, keep_open=False)
    linears = {f"{family.layers}.{i}.{name}" for i in _layer_ids(ck.names(), family) for name in family.linears}
    missing = sorted(f"{n}.weight" for n in linears if not ck.has(f"{n}.weight"))
    if missing:
        raise ModelFolderError(f"{src} lacks {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else ""))
    writer, rows = ShardWriter(tmp, max_shard_bytes), []
    for name in tqdm(sorted(ck.names(), key=_order), desc="RTN (streaming)", unit="tensor", disable=not progress):
        prefix = name.rsplit(".", 1)[0]
        if prefix in linears:
            if name.endswith(".weight"):
                W = ck.get(name).float()  # [N, K]
                N, K = W.shape
                if N % 8:
                    raise QuantizationError(f"{prefix}: out_features {N} is not a multiple of 8, which the packed layout needs")
                qweight, qzeros, scales = pack_linear(*quantize_weight(W, spec, None, None, prefix))
                writer.add(f"{prefix}.qweight", qweight)
                writer.add(f"{prefix}.qzeros", qzeros)
                writer.add(f"{prefix}.scales", scales)
                G = spec.group(K, prefix)
                rows.append({"name": prefix, "shape": [N, K], "bytes_fp16": 2 * N * K,
                             "bytes_packed": N * K // 2 + 4 * (K // G) * N // 8 + 2 * (K // G) * N, "layer": int(prefix.split(".")[2])})
            else:
                writer.add(name, _fp16(ck.get(name), name))  # a bias
            continue
        if KEPT.fullmatch(name) and not (tied and name == "lm_head.weight"):
            writer.add(name, _fp16(ck.get(name), name))
    rows.sort(key=lambda r: (r["layer"], family.linears.index(r["name"].split(".", 3)[3])))  # the model's order
    writer.close()  # safetensors orders a file's tensors by dtype and name: the same bytes as the loaded-model path
    return rows


def _fp16(t: torch.Tensor, name: str) -> torch.Tensor:
    out = t.to(torch.float16).contiguous()
    if not torch.isfinite(out).all():
        raise QuantizationError(f"{name} does not fit in fp16 after quantization (non-finite values)")
    return out


def _layer_ids(names: list[str], family: Family) -> Iterator[int]:
    pattern = re.compile(re.escape(family.layers) + r"\.(\d+)\.")
    return iter(sorted({int(m.group(1)) for n in names if (m := pattern.match(n))}))


def _order(name: str) -> tuple:
    """The model's own order: embedding, blocks by number, final norm, lm_head (one block's tensors read together)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed_tokens" in name else 2 if name.startswith("model.") else 3, 0, name)
