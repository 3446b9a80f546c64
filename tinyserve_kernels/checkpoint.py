"""Reading a Hugging Face folder's safetensors lazily, one tensor at a time, single-file or sharded (an index): the
runtime's loader and the quantizer's streaming path both read through it. Never unpickles anything."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """Tensor name -> safetensors file. error: the caller's exception type for a user's bad folder (one line).
    keep_open: hold each file open once read (fast for many reads); False opens it per tensor, so the pages a read
    maps are released at once (streaming a model much larger than memory)."""

    def __init__(self, folder: str | Path, error: type[Exception] = ValueError, keep_open: bool = True):
        self.folder, self.error, self.keep_open = Path(folder), error, keep_open
        index = self.folder / INDEX_FILE
        self.where: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise error(f"{index} is not a valid safetensors index: {e}") from None
            for name, file in weight_map.items():
                path = self.folder / file
                if not path.is_file():
                    raise error(f"{index} names shard {file}, which is missing from {self.folder}")
                self.where[name] = path
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                pickled = [p.name for p in self.folder.glob("*") if p.suffix in (".bin", ".pt", ".pth")]
                hint = f" (found {', '.join(pickled)}: pickle checkpoints are not loaded, convert them to safetensors)" if pickled else ""
                raise error(f"no .safetensors files in {self.folder}{hint}")
            for path in files:
                with self._open(path) as f:
                    for name in f.keys():
                        self.where[name] = path
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise self.error(f"cannot read {path}: {e}") from None

    def has(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def close(self) -> None:
        """Drop the open files (their memory maps would otherwise stay resident)."""
        self._handles.clear()

    def get(self, name: str, shape: tuple[int, ...] | None = None, why: str = "") -> torch.Tensor:
        if name not in self.where:
            raise self.error(f"missing tensor {name} in {self.folder}{f' ({why})' if why else ''}")
        path = self.where[name]
        if not self.keep_open:
            with self._open(path) as f:
                t = f.get_tensor(name)
        else:
            if path not in self._handles:
                self._handles[path] = self._open(path)
            t = self._handles[path].get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise self.error(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t
