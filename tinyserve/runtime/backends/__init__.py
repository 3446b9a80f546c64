"""Compute backends: how a model's steps run on a device, chosen once when the model is loaded.

    backend = plan(device, cfg, weights, options)       # converts the weights to its kernels' forms, owns the KV cache
    logits = backend.step([SeqChunk(slot, start, tokens), ...])   # [B, V] fp32; prompt chunks and decode rows alike

- eager (eager.py): model.forward with torch's ops and the INT4 dispatcher; any device, the reference path.
- cuda-graphs (cuda_graphs.py): eager prompts, decode steps replayed from CUDA graphs of model.forward.
- cpu-native (cpu_native.py): our C++ decoder around our CPU kernels.

TINYSERVE_CPU_KERNEL (read here, once per load): auto (default) uses cpu-native where it applies and one of its fast
engines runs (AMX, or AVX512-BF16 with VNNI); 1/on wherever it builds; 0/off never (not even built).
"""

import os

import torch

from tinyserve.runtime.backends.base import Backend, BackendOptions
from tinyserve.runtime.backends.cpu_native import CpuNativeBackend, applies as cpu_native_applies
from tinyserve.runtime.backends.cuda_graphs import CudaGraphBackend
from tinyserve.runtime.backends.eager import EagerBackend
from tinyserve.config import ModelConfig
from tinyserve.model import ModelWeights
from tinyserve_kernels import cpu_native

ENV_SWITCH = "TINYSERVE_CPU_KERNEL"

__all__ = ["Backend", "BackendOptions", "plan", "cpu_kernel_mode", "cpu_kernels_usable"]


def cpu_kernel_mode() -> str:
    """TINYSERVE_CPU_KERNEL as "auto", "on" or "off" (an unknown value counts as auto)."""
    v = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    return "on" if v in ("1", "on", "true", "yes") else "auto"


def cpu_kernels_usable(mode: str) -> bool:
    """Whether our CPU kernels run in this process under `mode` (building them on first use). auto rules a CPU out
    from its flags before any build, and needs one of the two fast engines (AMX also needs Linux's permission)."""
    if mode == "off" or (mode == "auto" and not cpu_native.has_fast_isa()):
        return False
    return cpu_native.available() and (mode == "on" or cpu_native.engine() in ("amx", "avx512bf16"))


def plan(device: torch.device, cfg: ModelConfig, weights: ModelWeights, opts: BackendOptions) -> Backend:
    """The backend for this model on this device; it takes over `weights` (converting them in place)."""
    if device.type == "cuda":
        return EagerBackend(cfg, weights, device, opts) if opts.compile == "off" else CudaGraphBackend(cfg, weights, device, opts)
    if cpu_native_applies(cfg, weights, opts.dtype) and cpu_kernels_usable(cpu_kernel_mode()):
        return CpuNativeBackend(cfg, weights, device, opts)
    return EagerBackend(cfg, weights, device, opts)
