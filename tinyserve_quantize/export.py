"""Writing a quantized model folder, atomically.

Packed folder (the AutoAWQ "GEMM" layout of tinyserve_kernels.layout):
    model.safetensors   every decoder linear as <name>.qweight / .qzeros / .scales (+ .bias), everything else fp16;
                        above max_shard_bytes instead model-0000i-of-0000n.safetensors + model.safetensors.index.json
    config.json         the source config + "quantization_config" (quant_method awq, bits, group_size, zero_point,
                        version gemm, modules_to_not_convert null) and dtype float16
    tokenizer files, chat template, generation_config.json: copied from the source folder
    quantization_report.json / .png: see report.py
Fake-quant folder (--fake): the same model as plain fp16 weights (quantize-dequantized), no quantization_config.

Everything is written to a temporary folder beside the target and renamed into place at the end, so a failure or an
interrupt never leaves a half-written model under the target name. The layout (tensor names, dtypes, shapes, config
keys, shards) is what vLLM's and SGLang's `awq` / `awq_marlin` loaders read: tests/test_quantize_serving_formats.py
checks it.
"""

import io
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from tinyserve_kernels.layout import dequantize
from tinyserve_quantize.awq import PackedLinear, QuantResult
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Largest shard, in bytes: huggingface_hub's split_torch_state_dict_into_shards default ("5GB" = 5 * 10**9).
SHARD_BYTES = 5 * 10**9
NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # weights are written, never copied
NOT_COPIED_NAMES = ("config.json", INDEX_FILE, "quantization_report.json", "quantization_report.png")


def quantization_config(spec: QuantSpec) -> dict:
    return {
        "quant_method": "awq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def _fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    out = t.detach().to(torch.float16).contiguous()
    if not torch.isfinite(out).all():
        raise QuantizationError(f"{name} does not fit in fp16 after quantization (non-finite values)")
    return out


def linear_tensors(name: str, p: PackedLinear, spec: QuantSpec, fake: bool) -> dict[str, torch.Tensor]:
    """One quantized linear as saved: <name>.qweight / .qzeros / .scales (+ .bias), or, fake, its dequantized .weight."""
    if fake:
        out = {f"{name}.weight": _fp16(f"{name}.weight", dequantize(p.qweight, p.qzeros, p.scales, spec.group_size).t())}
    else:
        out = {f"{name}.qweight": p.qweight, f"{name}.qzeros": p.qzeros, f"{name}.scales": _fp16(f"{name}.scales", p.scales)}
    if p.bias is not None:
        out[f"{name}.bias"] = _fp16(f"{name}.bias", p.bias)
    return out


def state_dict(model: torch.nn.Module, result: QuantResult, spec: QuantSpec, fake: bool, tied: bool) -> dict[str, torch.Tensor]:
    """A model quantized in memory (methods.quantize_model) -> the tensors to save: packed (or dequantized, when
    fake) decoder linears, every other parameter in fp16."""
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        prefix = key.rsplit(".", 1)[0]
        if prefix in result.linears or (tied and key == "lm_head.weight"):
            continue  # quantized below / shares the embedding's storage
        out[key] = _fp16(key, t)
    for name, p in result.linears.items():
        out.update(linear_tensors(name, p, spec, fake))
    return out


class FolderSink:
    """blockwise.quantize_blocks' results -> a ShardWriter, block by block (the streaming export)."""

    def __init__(self, writer: "ShardWriter", spec: QuantSpec, fake: bool):
        self.writer, self.spec, self.fake = writer, spec, fake
        self.linears = 0

    def block(self, linears: dict[str, PackedLinear], params: dict[str, torch.Tensor]) -> None:
        for name, p in linears.items():
            for key, t in linear_tensors(name, p, self.spec, self.fake).items():
                self.writer.add(key, t)
        self.linears += len(linears)
        for name, t in params.items():
            self.param(name, t)

    def param(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, _fp16(name, tensor))


def output_config(src_config: dict, spec: QuantSpec, fake: bool) -> dict:
    config = {k: v for k, v in src_config.items() if k not in ("quantization_config", "torch_dtype")}
    config["dtype"] = "float16"
    if not fake:
        config["quantization_config"] = quantization_config(spec)
    return config


# safetensors' dtype names, in the order its writer sorts a file's tensors by (descending), before their names.
DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
DTYPE_RANK = {name: i for i, name in enumerate(DTYPES.values())}
COPY_CHUNK = 64 * 2**20


class ShardWriter:
    """Tensors -> `folder`/model.safetensors, or, once they pass max_shard_bytes, model-0000i-of-0000n.safetensors and
    model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"}), the names transformers and vLLM look for.

    Each tensor's bytes go to the current shard's data file on disk as soon as it is added, so memory holds one tensor,
    not a shard (safetensors' save_file would hold the shard twice: the tensors and their serialized copy). A shard
    is finished, in safetensors' format and byte for byte what save_file writes (its tensors sorted by dtype, then
    name; tests/test_quantize_serving_formats.py), as soon as the next tensor would overflow it. A tensor larger than
    the limit gets a shard of its own. Shards are written under provisional names and renamed by close(), once their
    count is known; `folder` is expected to be a temporary folder that is renamed into place afterwards (write_folder)."""

    def __init__(self, folder: Path, max_shard_bytes: int = SHARD_BYTES):
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self._entries: list[tuple[str, str, list[int], int, int]] = []  # (name, dtype, shape, offset in data, bytes)
        self._data = None  # the current shard's data file
        self._shard_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # (provisional path, tensor names) per shard on disk
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} added twice")
        if tensor.dtype not in DTYPES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} is not written")
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._shard_bytes + size > self.max_shard_bytes:
            self._flush(self.folder / f".shard-{len(self._written) + 1:05d}.part")
        if self._data is None:
            self._data = open(self.folder / ".shard.data", "w+b")  # noqa: SIM115 (closed by _flush)
        offset = self._data.tell()
        self._data.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        self._entries.append((name, DTYPES[tensor.dtype], list(tensor.shape), offset, size))
        self._names.add(name)
        self._shard_bytes += size
        self.total_bytes += size

    def _flush(self, path: Path) -> None:
        """Write the current shard to path: 8-byte header length, JSON header (padded with spaces to 8 bytes), data."""
        order = sorted(self._entries, key=lambda e: (-DTYPE_RANK[e[1]], e[0]))
        header, start = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, _, size in order:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}
            start += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        data = self._data if self._data is not None else io.BytesIO()  # no tensor at all: an empty file, as save_file
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for _, _, _, offset, size in order:
                data.seek(offset)
                while size:
                    chunk = data.read(min(size, COPY_CHUNK))
                    f.write(chunk)
                    size -= len(chunk)
        data.close()
        if self._data is not None:
            os.remove(self.folder / ".shard.data")
        self._written.append((path, [e[0] for e in self._entries]))
        self._entries, self._data, self._shard_bytes = [], None, 0

    def close(self) -> list[str]:
        """Write what is left (and the index when sharded); returns the weights files' names."""
        if not self._written:  # everything fits one file: model.safetensors, as an unsharded export always wrote it
            self._flush(self.folder / WEIGHTS_FILE)
            self._written = []
            return [WEIGHTS_FILE]
        if self._entries:
            self._flush(self.folder / f".shard-{len(self._written) + 1:05d}.part")
        n = len(self._written)
        files, weight_map = [], {}
        for i, (path, names) in enumerate(self._written, 1):
            files.append(f"model-{i:05d}-of-{n:05d}.safetensors")
            os.replace(path, self.folder / files[-1])
            weight_map.update(dict.fromkeys(names, files[-1]))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self._written = []
        return files


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = SHARD_BYTES) -> list[str]:
    writer = ShardWriter(folder, max_shard_bytes)
    for name, t in tensors.items():
        writer.add(name, t)
    return writer.close()


def write_folder(
    out: Path,
    src: Path,
    tensors: dict[str, torch.Tensor] | Callable[[Path], None],
    config: dict,
    extra: Callable[[Path], None] | None = None,
    if_exists: str = "error",
    max_shard_bytes: int = SHARD_BYTES,
) -> bool:
    """Write the folder atomically. tensors: the weights, or a function that writes them into the temporary folder
    (streaming.py). extra(tmp_dir) may add files (the report). if_exists: "error" refuses an existing
    `out`, "replace" swaps it out only once the new folder is complete, "keep" leaves an existing one (another
    process finished first) and discards ours. Weights above max_shard_bytes are sharded (ShardWriter). Returns whether
    `out` is now the folder written here."""
    out = Path(out)
    if out.exists() and if_exists == "error":
        raise QuantizationError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if callable(tensors):
            tensors(tmp)
        else:
            write_tensors(tmp, tensors, max_shard_bytes)
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
