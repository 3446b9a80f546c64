"""Decode benchmark: tinyserve (INT4 and unquantized) against transformers `generate`, all in one run.

    python -m tinyserve bench                      # the embedded default model, CPU rows
    python -m tinyserve bench --synthetic llama2-7b --device cuda   # GPU: random weights with Llama-2-7B shapes

Every row runs in its own subprocess (so its peak memory is its own and rows cannot warm each other's caches), on the
same prompt token ids, greedy, batch 1, a fixed number of new tokens (EOS ignored). The rows run in `--repeat` rounds,
interleaved (int4, fp, hf-fp32, hf-bf16, int4, ...), and each row reports its best round: on a shared, noisy machine
the best of interleaved runs is the fairest estimate of every row's speed at the same time. Decode tok/s counts the tokens
after the first (the first comes from the prefill); detokenization is not timed (transformers' generate does not
detokenize either). The memory read bandwidth of the machine is measured in the same run, and tinyserve rows break
one decode step down into its linears and everything else.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROWS = ("int4", "fp", "hf-fp32", "hf-bf16")
SYNTHETIC_ROWS = ("int4", "hf-fp16")
# Shapes for --synthetic: random weights are enough to measure speed. "tiny" exists to test the code path on a CPU.
SYNTHETIC = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}
SYNTHETIC_GROUP_SIZE = 128


@dataclass
class BenchConfig:
    model: str | None = None  # INT4 folder; default: the embedded model, AWQ-quantized (cached)
    fp_model: str | None = None  # unquantized folder; default: the embedded model's fp16 folder
    rows: tuple[str, ...] = ROWS
    prompt_tokens: int = 128
    new_tokens: int = 128
    repeat: int = 3
    threads: int = 0
    device: str = "auto"
    lm_head: str = "auto"
    compile: str = "auto"
    synthetic: str | None = None
    json_out: str | None = None
    row: str | None = None  # internal: measure this one row in this process and print it as JSON

    def __post_init__(self):
        if self.synthetic is not None and self.synthetic not in SYNTHETIC:
            raise ValueError(f"unknown --synthetic preset {self.synthetic!r} (choose from {', '.join(SYNTHETIC)})")
        allowed = SYNTHETIC_ROWS if self.synthetic else ROWS
        bad = [r for r in self.rows if r not in allowed]
        if bad:
            raise ValueError(f"unknown rows {bad} (choose from {', '.join(allowed)})")
        if self.prompt_tokens <= 0 or self.new_tokens <= 1 or self.repeat <= 0:
            raise ValueError("--prompt-tokens, --repeat must be positive and --new-tokens at least 2")


@dataclass
class RowResult:
    name: str
    decode_tok_s: float
    prefill_tok_s: float
    ttft_s: float
    peak_mib: float
    bytes_per_token: int  # weights (and KV cache at the mean context length) read by one decode step
    device: str
    breakdown_ms: dict = field(default_factory=dict)  # per decode token: where the time goes (tinyserve rows)
    notes: str = ""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="INT4 (AWQ) folder; default: the embedded SmolLM2-135M-Instruct, AWQ-quantized")
    p.add_argument("--fp-model", help="unquantized folder for the float rows; default: the embedded model's fp16 folder")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {','.join(ROWS)} (synthetic: {','.join(SYNTHETIC_ROWS)})")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds over the rows; each row reports its best")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for every row (default: all cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--lm-head", choices=("auto", "dense", "int8"), default="auto", help="tinyserve INT4 row's output projection")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--synthetic", choices=tuple(SYNTHETIC), help="random weights with these shapes (GPU speed test)")
    p.add_argument("--json-out", help="also write the results here as JSON")
    p.add_argument("--row", help=argparse.SUPPRESS)


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    rows = tuple(a.rows.split(",")) if a.rows else (SYNTHETIC_ROWS if a.synthetic else ROWS)
    return BenchConfig(
        model=a.model, fp_model=a.fp_model, rows=rows, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, repeat=a.repeat,
        threads=a.threads, device=a.device, lm_head=a.lm_head, compile=a.compile, synthetic=a.synthetic, json_out=a.json_out, row=a.row,
    )


def to_argv(cfg: BenchConfig) -> list[str]:
    argv = ["--prompt-tokens", str(cfg.prompt_tokens), "--new-tokens", str(cfg.new_tokens), "--repeat", "1"]
    argv += ["--threads", str(cfg.threads), "--device", cfg.device, "--lm-head", cfg.lm_head, "--compile", cfg.compile]
    argv += ["--rows", ",".join(cfg.rows)]
    for flag, value in (("--model", cfg.model), ("--fp-model", cfg.fp_model), ("--synthetic", cfg.synthetic)):
        if value:
            argv += [flag, value]
    return argv


# ---- the parent: run every row in a subprocess, print the table ----------------------------------------------------


def main(cfg: BenchConfig) -> int:
    if cfg.row:
        result = run_row(cfg, cfg.row)
        print(json.dumps(asdict(result) if isinstance(result, RowResult) else result))
        return 0
    if not cfg.synthetic:
        resolve_folders(cfg)  # quantize / convert the defaults once, before the rows start
    env = dict(os.environ)
    rounds: dict[str, list[RowResult]] = {name: [] for name in cfg.rows}
    failed: set[str] = set()
    bandwidth = 0.0
    for r in range(cfg.repeat):
        bandwidth = max(bandwidth, _child(cfg, "bandwidth", env)["gb_s"])
        for name in cfg.rows:
            if name in failed:
                continue
            print(f"bench: round {r + 1}/{cfg.repeat}: {name} ...", file=sys.stderr, flush=True)
            try:
                rounds[name].append(RowResult(**_child(cfg, name, env)))
            except RuntimeError as e:  # report it and go on: the other rows are still worth having
                print(f"bench: {e}", file=sys.stderr, flush=True)
                failed.add(name)
    results = [max(rounds[name], key=lambda x: x.decode_tok_s) for name in cfg.rows if rounds[name]]
    print(format_table(cfg, results, bandwidth))
    if failed:
        print(f"\nfailed rows (see stderr): {', '.join(sorted(failed))}")
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump({"config": asdict(cfg), "bandwidth_gb_s": bandwidth, "best": [asdict(x) for x in results],
                       "rounds": {k: [asdict(x) for x in v] for k, v in rounds.items()}, "failed": sorted(failed)}, f, indent=2)
    return 1 if failed else 0


def resolve_folders(cfg: BenchConfig) -> None:
    from tinyserve.cli.default_model import default_folder, resolve_model

    if "int4" in cfg.rows:
        cfg.model = str(resolve_model(cfg.model))
    if any(r != "int4" for r in cfg.rows) and not cfg.fp_model:
        cfg.fp_model = str(default_folder("fp16"))


def _child(cfg: BenchConfig, row: str, env: dict) -> dict:
    cmd = [sys.executable, "-m", "tinyserve", "bench", *to_argv(cfg), "--row", row]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"benchmark row {row} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(cfg: BenchConfig, rows: list[RowResult], bandwidth_gb_s: float) -> str:
    base = next((r for r in rows if r.name in ("hf-fp32", "hf-fp16")), None)
    lines = [
        f"prompt {cfg.prompt_tokens} tokens, {cfg.new_tokens} new tokens, greedy, batch 1, best of {cfg.repeat} interleaved rounds "
        f"(each the median of {cfg.repeat} runs); "
        f"device {rows[0].device if rows else '?'}; measured {'copy' if 'cpu' not in (rows[0].device if rows else 'cpu') else 'read'} bandwidth {bandwidth_gb_s:.1f} GB/s",
        "",
        f"| row | decode tok/s | vs {base.name if base else 'baseline'} | prefill tok/s | TTFT ms | peak MiB | MB read/token | GB/s | % of bandwidth |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gbs = r.bytes_per_token * r.decode_tok_s / 1e9
        ratio = f"{r.decode_tok_s / base.decode_tok_s:.2f}x" if base else "-"
        lines.append(
            f"| {label(r.name)} | {r.decode_tok_s:.1f} | {ratio} | {r.prefill_tok_s:.0f} | {r.ttft_s * 1e3:.1f} | {r.peak_mib:.0f} | "
            f"{r.bytes_per_token / 1e6:.1f} | {gbs:.1f} | {100 * gbs / bandwidth_gb_s:.0f}% |"
        )
    if any(r.bytes_per_token * r.decode_tok_s / 1e9 > bandwidth_gb_s for r in rows):
        lines.append("\nAbove 100%: the bandwidth above reads 1 GiB from memory, while a step's weights can stay in a large "
                     f"last-level cache between tokens{_llc_note()}.")
    for r in rows:
        if r.breakdown_ms:
            b = r.breakdown_ms
            parts = ", ".join(f"{k} {v:.2f}" for k, v in b.items())
            lines.append(f"\n{label(r.name)}, ms per decode token: {parts}")
        if r.notes:
            lines.append(f"{label(r.name)}: {r.notes}")
    return "\n".join(lines)


def _llc_note() -> str:
    """' (this CPU's: N MiB)' from Linux's cache description, or '' where it is not there."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()  # e.g. "491520K"
        return f" (this CPU's: {int(size.removesuffix('K')) // 1024} MiB)" if size.endswith("K") else f" (this CPU's: {size})"
    except (OSError, ValueError):
        return ""


def label(name: str) -> str:
    return {
        "int4": "tinyserve INT4",
        "fp": "tinyserve unquantized",
        "hf-fp32": "transformers fp32",
        "hf-bf16": "transformers bf16",
        "hf-fp16": "transformers fp16",
    }.get(name, name)


# ---- one row, in its own process ----------------------------------------------------------------------------------


def run_row(cfg: BenchConfig, row: str):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if row == "bandwidth":
        return {"gb_s": measure_bandwidth(cfg)}
    ids = prompt_ids(cfg)
    if row in ("int4", "fp"):
        return bench_tinyserve(cfg, row, ids)
    return bench_transformers(cfg, row, ids)


def _device(cfg: BenchConfig) -> torch.device:
    from tinyserve.runtime.runner import resolve_device

    return resolve_device(cfg.device)


def measure_bandwidth(cfg: BenchConfig) -> float:
    """GB/s, best of several passes over 1 GiB. CPU: read bandwidth (a reduction reads every byte once), which is
    what decode is bound by. CUDA: copy bandwidth (bytes read + written by a device-to-device copy)."""
    dev = _device(cfg)
    x = torch.ones(1 << 28, dtype=torch.float32, device=dev)
    y = torch.empty_like(x) if dev.type == "cuda" else None
    best = float("inf")
    for _ in range(6):
        _sync(dev)
        t = time.perf_counter()
        if y is None:
            x.sum()
        else:
            y.copy_(x)
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 * (2 if y is not None else 1) / best / 1e9


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def prompt_ids(cfg: BenchConfig) -> list[int]:
    """The first prompt_tokens tokens of Botchan's evaluation slice (random ids for synthetic models)."""
    if cfg.synthetic:
        g = torch.Generator().manual_seed(0)
        return torch.randint(10, SYNTHETIC[cfg.synthetic]["vocab_size"], (cfg.prompt_tokens,), generator=g).tolist()
    from tinyserve_quantize.text_data import eval_text
    from tinyserve.generation.tokenizer import Tokenizer

    folder = cfg.model if cfg.model else cfg.fp_model
    ids = Tokenizer(folder).encode(eval_text()[:20000])[: cfg.prompt_tokens]
    if len(ids) < cfg.prompt_tokens:
        raise ValueError(f"the benchmark text has only {len(ids)} tokens")
    return ids


def _peak_mib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_tinyserve(cfg: BenchConfig, row: str, ids: list[int]) -> RowResult:
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig

    dev = _device(cfg)
    rc = RunnerConfig(
        device=str(dev), max_seq_len=cfg.prompt_tokens + cfg.new_tokens + 8, threads=cfg.threads,
        lm_head=cfg.lm_head if row == "int4" else "auto", compile=cfg.compile,
    )
    if cfg.synthetic:
        mcfg, weights = synthetic_int4(cfg.synthetic, dev, torch.float16 if dev.type == "cuda" else torch.bfloat16)
        runner = ModelRunner(None, rc, model_config=mcfg, weights=weights)
    else:
        runner = ModelRunner(cfg.model if row == "int4" else cfg.fp_model, rc)
    slot = runner.alloc_slot()
    t0 = time.perf_counter()
    _greedy(runner, slot, ids[:16], 8)  # warm-up (and CUDA graph capture for the first buckets)
    warmup_s = time.perf_counter() - t0
    runs = [_greedy(runner, slot, ids, cfg.new_tokens) for _ in range(cfg.repeat)]
    ttft, decode_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    decode_tok_s = (cfg.new_tokens - 1) / decode_s
    mean_context = cfg.prompt_tokens + cfg.new_tokens // 2
    bytes_per_token = runner.weights.decode_bytes() + mean_context * runner.cache.bytes_per_token()
    breakdown = time_breakdown(runner, slot, mean_context, 1e3 / decode_tok_s)
    return RowResult(
        name=row, decode_tok_s=decode_tok_s, prefill_tok_s=len(ids) / ttft, ttft_s=ttft, peak_mib=_peak_mib(dev),
        bytes_per_token=bytes_per_token, device=describe(dev), breakdown_ms=breakdown,
        notes=f"backend {runner.backend.name}, dtype {str(runner.dtype).removeprefix('torch.')}, lm_head {runner.weights.lm_head.__class__.__name__}, warm-up {warmup_s:.1f} s",
    )


def _greedy(runner, slot: int, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """Prefill ids into a fresh sequence in `slot` and decode new_tokens greedily. Returns (ttft_s, decode_s)."""
    dev = runner.device
    _sync(dev)
    t0 = time.perf_counter()
    tok = int(runner.prefill(slot, ids).argmax())
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = int(runner.decode([slot], [tok]).argmax())
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def time_breakdown(runner, slot: int, context: int, token_ms: float, n: int = 30) -> dict:
    """Where one decode token's time goes, in ms: the backend's linears alone (called back to back on one row of the
    right shapes), the rest of the step (attention, norms, RoPE, cache writes, residuals, dispatch and Python), and
    the generation loop around the step (argmax, bookkeeping)."""
    w, c, dev = runner.weights, runner.cfg, runner.device
    pos = min(context, runner.length(slot) - 1)

    def timed(fn) -> float:
        fn()
        _sync(dev)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(dev)
        return (time.perf_counter() - t) / n * 1e3

    step_ms = timed(lambda: runner.decode([slot], [0], positions=[pos]))
    x = torch.randn(1, c.hidden_size, dtype=runner.dtype, device=dev)
    xa = torch.randn(1, c.q_size, dtype=runner.dtype, device=dev)
    xi = torch.randn(1, c.intermediate_size, dtype=runner.dtype, device=dev)

    def linears():
        for lw in w.layers:
            lw.qkv(x), lw.o(xa), lw.gate_up(x), lw.down(xi)
        w.lm_head(x)

    lin_ms = timed(linears)
    return {
        "step": step_ms,
        "linears": lin_ms,
        "rest of step": max(step_ms - lin_ms, 0.0),
        "loop": max(token_ms - step_ms, 0.0),
    }


def describe(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu x{torch.get_num_threads()} threads"


def bench_transformers(cfg: BenchConfig, row: str, ids: list[int]) -> RowResult:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    dev = _device(cfg)
    dtype = {"hf-fp32": torch.float32, "hf-bf16": torch.bfloat16, "hf-fp16": torch.float16}[row]
    if cfg.synthetic:
        with torch.device(dev):
            model = LlamaForCausalLM(LlamaConfig(**SYNTHETIC[cfg.synthetic], max_position_embeddings=4096)).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.fp_model, dtype=dtype).to(dev)
    model.eval()
    input_ids = torch.tensor([ids], device=dev)

    class Clock:
        """A generate() streamer that only timestamps: put() gets the prompt first, then each new token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            _sync(dev)
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(n: int) -> tuple[float, float]:
        """(ttft_s, decode_s for tokens 2..n) from one generate call."""
        clock = Clock()
        _sync(dev)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)
        assert out.shape[1] == len(ids) + n and len(clock.times) == n + 1
        return clock.times[1] - t, clock.times[-1] - clock.times[1]

    run(8)  # warm-up
    runs = [run(cfg.new_tokens) for _ in range(cfg.repeat)]
    ttft, decode_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    decode_tok_s = (cfg.new_tokens - 1) / decode_s
    mc = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for p in model.parameters())
    # One decode step reads every weight once (the embedding only through the tied lm_head, or one row of it).
    if not mc.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    kv_per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * head_dim * elem
    bytes_per_token = params * elem + (cfg.prompt_tokens + cfg.new_tokens // 2) * kv_per_token
    return RowResult(
        name=row, decode_tok_s=decode_tok_s, prefill_tok_s=len(ids) / ttft, ttft_s=ttft, peak_mib=_peak_mib(dev),
        bytes_per_token=bytes_per_token, device=describe(dev), notes="",
    )


def synthetic_int4(preset: str, dev: torch.device, dtype: torch.dtype):
    """A ModelConfig and random INT4 (group 128) weights with the preset's shapes, built directly on the device (as
    weights.load_weights returns them: the backend converts them)."""
    from tinyserve.config import ModelConfig, QuantConfig
    from tinyserve.model import DenseLinear, LayerWeights, ModelWeights, PackedLinear

    shapes = SYNTHETIC[preset]
    d = dict(shapes, model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=4096, rms_norm_eps=1e-5)
    cfg = ModelConfig.from_dict(d, QuantConfig(bits=4, group_size=SYNTHETIC_GROUP_SIZE))
    g = torch.Generator(device=dev).manual_seed(0)
    G = SYNTHETIC_GROUP_SIZE

    def int4(k: int, n: int) -> PackedLinear:
        qweight = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32, device=dev, generator=g)
        qzeros = torch.randint(-(2**31), 2**31 - 1, (k // G, n // 8), dtype=torch.int32, device=dev, generator=g)
        scales = (torch.rand(k // G, n, device=dev, generator=g) * 0.01).half()
        return PackedLinear(qweight, qzeros, scales, G)

    H, I = cfg.hidden_size, cfg.intermediate_size
    layers = [
        LayerWeights(
            attn_norm=torch.ones(H, dtype=dtype, device=dev), qkv=int4(H, cfg.q_size + 2 * cfg.kv_size), o=int4(cfg.q_size, H),
            mlp_norm=torch.ones(H, dtype=dtype, device=dev), gate_up=int4(H, 2 * I), down=int4(I, H),
        )
        for _ in range(cfg.num_layers)
    ]
    embed = (torch.randn(cfg.vocab_size, H, device=dev, generator=g) * 0.02).to(dtype)
    head = DenseLinear((torch.randn(cfg.vocab_size, H, device=dev, generator=g) * 0.02).to(dtype))
    return cfg, ModelWeights(embed=embed, layers=layers, norm=torch.ones(H, dtype=dtype, device=dev), lm_head=head)
