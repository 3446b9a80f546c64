"""One quantization run: validate the folders, calibrate, quantize block by block straight from the checkpoint into the
output folder (blocks.Checkpointed -> blockwise.quantize_blocks -> export.FolderSink), write the report.

Used by `python -m tinyserve_quantize` and by default_model.ensure_quantized_default(). Every user mistake raises one of
QuantizationError, CalibrationError, ModelFolderError (all ValueErrors) with a one-line message, before any long work
where it can be known in advance.
"""

import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tinyserve_quantize.awq import SearchConfig, check_model
from tinyserve_quantize.blocks import Checkpointed
from tinyserve_quantize.blockwise import quantize_blocks, resolve_device
from tinyserve_quantize.calibration import CalibrationError, calibration_windows
from tinyserve_quantize.export import SHARD_BYTES, FolderSink, ShardWriter, output_config, write_folder
from tinyserve_quantize.gptq import GPTQConfig
from tinyserve_quantize.methods import CALIBRATED, METHODS
from tinyserve_quantize.model_families import family_for
from tinyserve_quantize.model_io import ModelFolderError, awq_config, config_dtype, load_tokenizer, read_config, weight_files
from tinyserve_quantize.quantizer import QuantizationError, QuantSpec
from tinyserve_quantize.report import write_report
from tinyserve_quantize.streaming import stream_rtn
from tinyserve_quantize.text_data import calib_text, read_user_text

USER_ERRORS = (QuantizationError, CalibrationError, ModelFolderError)


@dataclass
class QuantizeConfig:
    model: Path
    out: Path
    method: str = "awq-gptq-attn"  # methods.py; the best measured (BENCHMARKS.md, issue 20)
    w_bit: int = 4
    group_size: int = 64
    calib_text: Path | None = None  # default: the built-in calibration slice (Botchan chapters V-XI)
    n_samples: int = 128
    seqlen: int = 512
    fake: bool = False  # write quantize-dequantized fp16 weights instead of packed ones
    overwrite: bool = False
    search: SearchConfig = field(default_factory=SearchConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    max_shard_bytes: int = SHARD_BYTES  # larger weights are written as model-0000i-of-0000n.safetensors + index
    device: str = "auto"  # where the blocks are quantized: auto (CUDA when present), cpu, cuda

    def __post_init__(self):
        self.model, self.out = Path(self.model), Path(self.out)
        if self.method not in METHODS:
            raise QuantizationError(f"method {self.method!r}; choose one of {list(METHODS)}")
        if self.n_samples < 1 or self.seqlen < 2:
            raise QuantizationError("--n-samples must be at least 1 and --seqlen at least 2")
        if self.max_shard_bytes < 1:
            raise QuantizationError(f"--max-shard-size must be at least 1 byte, not {self.max_shard_bytes}")
        self.spec = QuantSpec(self.w_bit, self.group_size)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def run(cfg: QuantizeConfig, log=log_stderr, progress: bool = True, if_exists: str | None = None) -> dict:
    """Quantize cfg.model into cfg.out. Returns the run's summary (also saved in the report)."""
    t_start = time.perf_counter()
    src_config = read_config(cfg.model)
    family = family_for(src_config)
    if awq_config(src_config) is not None:
        raise ModelFolderError(f"{cfg.model} is already quantized; quantize an fp16, bf16 or fp32 model")
    dtype = config_dtype(src_config)
    weight_files(cfg.model)
    if cfg.out.resolve() == cfg.model.resolve():
        raise QuantizationError("--out must differ from --model")
    if_exists = if_exists or ("replace" if cfg.overwrite else "error")
    if cfg.out.exists() and if_exists == "error":
        raise QuantizationError(f"{cfg.out} already exists; pass --overwrite to replace it")
    texts = None
    if cfg.method in CALIBRATED and cfg.calib_text is not None:
        texts = read_user_text(cfg.calib_text, "calibration text", CalibrationError)

    device = resolve_device(cfg.device)
    if cfg.method == "rtn" and not cfg.fake:
        return run_streaming_rtn(cfg, src_config, family, dtype, bool(src_config.get("tie_word_embeddings", False)), t_start, log,
                                 progress, if_exists)

    source = Checkpointed(cfg.model, family)
    check_model(source.model, family, cfg.spec)
    windows, calib = None, None
    if cfg.method in CALIBRATED:
        tokenizer = load_tokenizer(cfg.model)
        windows = calibration_windows(tokenizer, calib_text() if texts is None else texts, cfg.n_samples, cfg.seqlen, log)
        calib = {"windows": len(windows), "seqlen": cfg.seqlen, "tokens": windows.numel(),
                 "text": str(cfg.calib_text) if cfg.calib_text else "built-in Botchan chapters V-XI"}
    search = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(cfg.search).items()}
    summary = {
        "title": f"{cfg.model.name}: {cfg.method.upper()} w{cfg.w_bit} g{cfg.group_size}",
        "source": str(cfg.model),
        "source_dtype": dtype,
        "method": cfg.method,
        "bits": cfg.w_bit,
        "group_size": cfg.group_size,
        "fake": cfg.fake,
        "calibration": calib,
        "search": search if cfg.method in CALIBRATED else None,
        "gptq": asdict(cfg.gptq.resolved(cfg.method)) if "gptq" in cfg.method else None,
        "streamed": True,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    rows: list[dict] = []

    def weights(tmp: Path) -> None:
        t0 = time.perf_counter()
        writer = ShardWriter(tmp, cfg.max_shard_bytes)
        sink = FolderSink(writer, cfg.spec, cfg.fake)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        outcome = quantize_blocks(cfg.method, source, cfg.spec, windows, sink, cfg.search, cfg.gptq, progress, log, tmp, device)
        if device == "cuda":
            summary["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        writer.close()
        rows.extend(outcome.report)
        summary.update(linears=sink.linears, quantize_seconds=round(time.perf_counter() - t0, 1))
        if outcome.gate is not None:
            summary["clip_gate"] = outcome.gate
        for key in ("mse_rtn", "mse_awq", "mse_gptq"):
            if rows and key in rows[0]:
                summary[f"sum_{key}"] = sum(r[key] for r in rows)

    def report(tmp: Path) -> None:
        summary.update(wall_seconds=round(time.perf_counter() - t_start, 1), peak_rss_gib=round(peak_rss_gib(), 2))
        write_report(tmp, summary, rows)

    written = write_folder(cfg.out, cfg.model, weights, output_config(src_config, cfg.spec, cfg.fake), report, if_exists)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    what = "fake-quantized fp16" if cfg.fake else "packed"
    if written:
        log(f"quantize: wrote {what} {cfg.method.upper()} w{cfg.w_bit} g{cfg.group_size} model to {cfg.out} "
            f"({summary['linears']} linears; quantization {summary['quantize_seconds']:.1f} s, total {summary['wall_seconds']:.1f} s, "
            f"peak RSS {summary['peak_rss_gib']:.2f} GiB" + (f", peak GPU memory {summary['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in summary else "")
            + f"; on {device})")
    else:
        log(f"quantize: {cfg.out} was written meanwhile by another process; keeping it")
    return summary


def run_streaming_rtn(cfg: QuantizeConfig, src_config: dict, family, dtype: str, tied: bool, t_start: float, log, progress: bool,
                      if_exists: str) -> dict:
    """RTN straight from the checkpoint to the output folder, one tensor at a time (streaming.py): the model is never
    loaded, so memory does not grow with its size."""
    rows: list[dict] = []
    summary = {"title": f"{cfg.model.name}: RTN w{cfg.w_bit} g{cfg.group_size}", "source": str(cfg.model), "source_dtype": dtype,
               "method": "rtn", "bits": cfg.w_bit, "group_size": cfg.group_size, "fake": False, "calibration": None,
               "search": None, "gptq": None, "streamed": True, "threads": torch.get_num_threads()}

    def weights(tmp: Path) -> None:
        t0 = time.perf_counter()
        rows.extend(stream_rtn(cfg.model, tmp, family, cfg.spec, tied, cfg.max_shard_bytes, progress))
        summary.update(linears=len(rows), quantize_seconds=round(time.perf_counter() - t0, 1))

    def report(tmp: Path) -> None:
        summary.update(wall_seconds=round(time.perf_counter() - t_start, 1), peak_rss_gib=round(peak_rss_gib(), 2))
        write_report(tmp, summary, rows)

    written = write_folder(cfg.out, cfg.model, weights, output_config(src_config, cfg.spec, False), report, if_exists, cfg.max_shard_bytes)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if written:
        log(f"quantize: wrote packed RTN w{cfg.w_bit} g{cfg.group_size} model to {cfg.out}, streamed ({summary['linears']} linears; "
            f"quantization {summary['quantize_seconds']:.1f} s, total {summary['wall_seconds']:.1f} s, peak RSS {summary['peak_rss_gib']:.2f} GiB)")
    else:
        log(f"quantize: {cfg.out} was written meanwhile by another process; keeping it")
    return summary

