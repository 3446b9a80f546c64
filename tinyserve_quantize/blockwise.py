"""The quantization loop over decoder blocks, for every method, from a block source (blocks.py) into a sink.

Layer 0's inputs are captured once. Then per block: load it (fp32); run it unquantized in the compute dtype (fp32
for awq-gptq-attn: GPTQConfig.fp32) on its inputs, collecting input statistics (calibration.run_block),
whose outputs are the next block's inputs; quantize it (awq.quantize_block, gptq.gptq_block, awq.rtn_block); hand
the result to the sink, or, with AWQ's gate, to the gate, which hands every block to the sink once it has decided;
release it. Memory holds one block, its inputs and outputs [B, S, H] and its statistics, whatever the model's
depth; the sink decides where the results go (the output folder, shard by shard: export.FolderSink; or a QuantResult
in memory: methods.quantize_model).

Device: the block, its inputs and everything computed from them live on `device` (a GPU when there is one); the
loop runs under `torch.device(device)` so the methods' own tensors (scale grids, Hessian factors) are made there too.
The model never has to fit on it: one block is moved there and back. Results come back to host memory per block.
"""

import contextlib
import copy
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from tinyserve_quantize.awq import PackedLinear, SearchConfig, quantize_block, rtn_block
from tinyserve_quantize.calibration import capture_block_inputs, cast, run_block
from tinyserve_quantize.clip_gate import Gate
from tinyserve_quantize.gptq import GPTQConfig, gptq_block
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec
from tinyserve_quantize.value_stats import AttentionShape, ValueSite

LABELS = {"rtn": "RTN", "awq": "AWQ", "gptq": "GPTQ", "awq-gptq": "AWQ+GPTQ", "awq-gptq-attn": "AWQ+GPTQ-attn"}


class Sink(Protocol):
    def block(self, linears: dict[str, PackedLinear], params: dict[str, torch.Tensor]) -> None:
        """One block's packed linears and other parameters (full names), in the model's order."""

    def param(self, name: str, tensor: torch.Tensor) -> None:
        """A parameter outside the decoder blocks (embedding, final norm, head)."""


@dataclass
class Outcome:
    report: list[dict]  # one row per linear, in the model's order
    gate: dict | None  # the gate's outcome, when it ran


def resolve_device(name: str) -> str:
    """--device: "auto" is CUDA when present, else the CPU; "cuda" without a GPU is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise QuantizationError(f"device {name!r}; choose auto, cpu or cuda")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise QuantizationError("--device cuda: torch sees no CUDA device (this torch build or machine has none); use --device cpu")
    return name


def on(device: str):
    """Factory functions default to `device` inside. Not entered for the CPU, the default already: the mode wraps
    every torch call in Python (measured ~3% of a small model's quantization)."""
    return contextlib.nullcontext() if device == "cpu" else torch.device(device)


def forward_copy(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The block a calibration forward pass runs: the block itself where it already holds dtype (fp32: no copy), else
    a copy cast to dtype."""
    return block if next(block.parameters()).dtype == dtype else copy.deepcopy(block).to(dtype)


def gate_windows(windows: torch.Tensor, search: SearchConfig) -> torch.Tensor:
    """The held-out windows (calibration.run_block's split) the gate runs on: gate_windows of them, spread out."""
    B = len(windows)
    held = [i for i in range(B) if search.holdout_every and i % search.holdout_every == search.holdout_every - 1] or list(range(B))
    n = min(search.gate_windows, len(held))
    return windows[[held[round(j * len(held) / n)] for j in range(n)]]


@torch.no_grad()
def quantize_blocks(
    method: str,
    source,
    spec: QuantSpec,
    windows: torch.Tensor | None,
    sink: Sink,
    search: SearchConfig = SearchConfig(),
    gptq: GPTQConfig = GPTQConfig(),
    progress: bool = True,
    log: Callable[[str], None] = print,
    spill_dir: Path | None = None,
    device: str = "cpu",
) -> Outcome:
    """Quantize every decoder block of source (blocks.LoadedModel / Checkpointed) with `method` into sink.
    windows [B, S] calibration token ids (unused by rtn). spill_dir: where the gate spills blocks (a temporary folder
    is made inside it; default: the system's). device: where the blocks are quantized (resolve_device)."""
    family, rows, gate_summary = source.family, [], None
    gptq = gptq.resolved(method)
    if gptq.fp32:
        search = replace(search, compute_dtype=torch.float32)
    blocks = tqdm(range(len(source)), desc=LABELS[method], unit="block", disable=not progress)
    if method == "rtn":
        for i in blocks:
            block = source.load(i)
            with on(device):
                out = rtn_block(block.to(device), i, family, spec).cpu()
            block.to("cpu")
            rows += out.report
            sink.block(out.linears, out.params)
            source.release(i)
    else:
        layers = source.model.get_submodule(family.layers)
        inputs, kwargs = capture_block_inputs(source.model, layers, windows)  # [B, S, H] fp32, on the host
        inputs, kwargs = inputs.to(device), {k: cast(v, device=device) for k, v in kwargs.items()}
        with ExitStack() as stack:
            gate = None
            if method == "awq" and search.clip_gate:
                spill = stack.enter_context(tempfile.TemporaryDirectory(prefix="tinyserve-gate-", dir=spill_dir))
                gate = Gate(source, gate_windows(windows, search), spec.group_size, Path(spill), search.compute_dtype, search.gate_z,
                            search.gate_cache_bytes, device)
            source.release_embedding()
            stack.enter_context(on(device))
            for i in blocks:
                block = source.load(i).to(device)
                runner = forward_copy(block, search.compute_dtype)
                sites = {g.linears[0]: runner.get_submodule(g.linears[0]) for g in family.groups}
                value = None
                if method != "awq" and gptq.value_hessian:
                    attn = runner.get_submodule(family.attention)
                    value = ValueSite(family.groups[0].linears[0], attn.q_proj, attn.k_proj, AttentionShape.of(attn))
                # GPTQ's quantized calibration inputs come from the quantized block's pass below: this one can stop
                # at the last site's input
                requantize = method != "awq" and gptq.calib_inputs == "quantized"
                outputs, stats = run_block(runner, inputs, kwargs, sites, search.holdout_every, search.token_stride,
                                           value=value, outputs=not requantize)
                del runner
                if method == "awq":
                    out = quantize_block(block, i, family, spec, search, stats, alternatives=gate is not None)
                else:
                    out = gptq_block(block, i, family, spec, gptq, stats, search, awq=method.startswith("awq-"))
                    if requantize:  # the next block sees what the quantized model will feed it
                        runner = forward_copy(block, search.compute_dtype)
                        outputs, _ = run_block(runner, inputs, kwargs, {}, search.holdout_every)
                        del runner
                rows += out.report
                if gate is not None:
                    gate.record(block, out.cpu())
                else:
                    out = out.cpu()
                    sink.block(out.linears, out.params)
                block.to("cpu")  # a loaded model's block goes home; a checkpoint's is released next
                del stats, block
                source.release(i)
                inputs = outputs
            del inputs, outputs  # the last block's outputs ([B, S, H] fp32) are not needed by the gate or the export
            if gate is not None:
                if gate.rows:  # some sub-block has an alternative to test
                    bar = (lambda it: tqdm(it, desc="gate", unit="block")) if progress else None
                    outcome = gate.decide(bar)
                    gate.annotate(rows)
                    counts = {label: sum(1 for lb in outcome.decisions.values() if lb == label) for label in ("unclipped", "rtn")}
                    gate_summary = {"windows": len(gate.inputs), "kl_search": outcome.kl_search, "kl_final": outcome.kl_final,
                                    "tested": outcome.tested, "decisions": outcome.decisions}
                    log(f"gate: KL to fp {outcome.kl_search:.5f} -> {outcome.kl_final:.5f} nats/token on {len(gate.inputs)} held-out "
                        f"windows; of {outcome.tested} sub-blocks, {counts['unclipped']} went unclipped, {counts['rtn']} back to RTN")
                for i in range(len(source)):
                    sink.block(*gate.block(i))
    for name, t in source.extra_params():
        sink.param(name, t)
    return Outcome(rows, gate_summary)
