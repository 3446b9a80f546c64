"""Streaming RTN (tinyserve_quantize/streaming.py): the checkpoint is read one tensor at a time and the output written
shard by shard. It must write the same bytes as quantizing the loaded model, for both families (Qwen2: q/k/v biases,
untied lm_head), and its sharded output must read back as the single file does."""

import dataclasses
import json

import pytest
import torch

from tinyserve_quantize.__main__ import parse_args
from tinyserve_quantize.awq import check_model
from tinyserve_quantize.methods import quantize_model
from tinyserve_quantize.export import output_config, state_dict, write_folder
from tinyserve_quantize.model_families import family_for
from tinyserve_quantize.model_io import load_model, read_config
from tinyserve_quantize.pipeline import run
from tinyserve_quantize.quantizer import QuantSpec


def loaded_model_rtn(src, out, group_size: int) -> None:
    """The path every calibrated method takes: the whole model loaded in fp32, quantized in place, then exported."""
    config = read_config(src)
    family, spec, model = family_for(config), QuantSpec(4, group_size), load_model(src)
    check_model(model, family, spec)
    result = quantize_model("rtn", model, family, spec, None, progress=False)
    tensors = state_dict(model, result, spec, False, bool(config.get("tie_word_embeddings", False)))
    write_folder(out, src, tensors, output_config(config, spec, False))


@pytest.mark.parametrize("group_size", [32, -1])
def test_streaming_rtn_writes_the_loaded_model_paths_bytes(tiny_model_dir, tmp_path, group_size):
    loaded_model_rtn(tiny_model_dir, tmp_path / "loaded", group_size)
    summary = run(parse_args(["--model", str(tiny_model_dir), "--out", str(tmp_path / "streamed"), "--method", "rtn", "--group-size", str(group_size)]),
                  log=lambda m: None, progress=False)
    assert summary["streamed"] and summary["linears"] == 7 * read_config(tiny_model_dir)["num_hidden_layers"]
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "loaded" / f).read_bytes(), f
    report = json.loads((tmp_path / "streamed" / "quantization_report.json").read_text())
    assert [r["name"].split(".", 3)[3] for r in report["layers"][:7]] == list(family_for(read_config(tiny_model_dir)).linears)


@torch.inference_mode()
def test_streamed_shards_read_back_as_the_single_file(tiny_model_dir, tmp_path):
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig

    for name, extra in (("single", []), ("sharded", ["--max-shard-size", "40000"])):
        run(parse_args(["--model", str(tiny_model_dir), "--out", str(tmp_path / name), "--method", "rtn", "--group-size", "32", *extra]),
            log=lambda m: None, progress=False)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "sharded" / "model.safetensors").exists()
    logits = {}
    for name in ("single", "sharded"):
        r = ModelRunner(tmp_path / name, RunnerConfig(device="cpu", dtype="float32", max_seq_len=32))
        logits[name] = r.prefill(r.alloc_slot(), [1, 2, 3, 4, 5])
    assert torch.equal(logits["single"], logits["sharded"])


def write_random_llama(folder, layers: int, hidden: int = 256, intermediate: int = 704, vocab: int = 1024):
    """A random fp16 Llama checkpoint (config.json + model.safetensors), no tokenizer: RTN needs none."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(layers)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    kv = hidden // 2
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate)})
    save_file({k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()}, str(folder / "model.safetensors"))
    return folder


def peak_rss_mib(code: str) -> float:
    import os
    import subprocess
    import sys

    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork and exec. A fixed mmap
    # threshold: with glibc's adaptive one, freed blocks' memory stays in the heap and RSS creeps up ~60 MB over the
    # first dozen blocks before it levels off, which would read as growth with the depth.
    peak = "\nprint(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code + peak], capture_output=True, text=True, check=True, timeout=300, env=env).stdout
    return float(out.strip().splitlines()[-1])


def test_streaming_memory_does_not_grow_with_the_layers(tmp_path):
    """Peak RSS of streaming RTN on a 24-layer model is within a margin of the 2-layer one's (the 22 extra layers are
    ~85 MB in fp32); loading the model, as the calibrated methods still do, grows by more than the margin, which shows
    the check can fail. Shards of 1 MB, so the output held at once stays small too."""
    small, big = write_random_llama(tmp_path / "l2", 2), write_random_llama(tmp_path / "l24", 24)
    stream = ("from tinyserve_quantize.__main__ import parse_args\nfrom tinyserve_quantize.pipeline import run\n"
              "run(parse_args(['--model', '{src}', '--out', '{dst}', '--method', 'rtn', '--group-size', '32', '--max-shard-size', '1000000']),"
              " log=lambda m: None, progress=False)")
    load = "from tinyserve_quantize.model_io import load_model\nm = load_model('{src}')"
    rss = {(kind, n): peak_rss_mib(code.format(src=src, dst=tmp_path / f"{kind}-{n}"))
           for kind, code in (("stream", stream), ("load", load)) for n, src in ((2, small), (24, big))}
    margin = 30.0
    assert rss[("stream", 24)] - rss[("stream", 2)] < margin, rss
    assert rss[("load", 24)] - rss[("load", 2)] > margin, rss



def loaded_model_quantize(cfg) -> dict:
    """The in-memory path: the whole model loaded in fp32 (model_io.load_model), quantized in place by
    methods.quantize_model, exported with export.state_dict."""
    from tinyserve_quantize.calibration import calibration_windows
    from tinyserve_quantize.model_io import load_tokenizer
    from tinyserve_quantize.text_data import calib_text

    config = read_config(cfg.model)
    family, model = family_for(config), load_model(cfg.model)
    windows = calibration_windows(load_tokenizer(cfg.model), calib_text(), cfg.n_samples, cfg.seqlen, log=lambda m: None)
    result = quantize_model(cfg.method, model, family, cfg.spec, windows, cfg.search, cfg.gptq, progress=False, log=lambda m: None)
    tensors = state_dict(model, result, cfg.spec, cfg.fake, bool(config.get("tie_word_embeddings", False)))
    write_folder(cfg.out, cfg.model, tensors, output_config(config, cfg.spec, cfg.fake))
    return {"gate": result.gate, "report": result.report}


@pytest.mark.parametrize("method,extra", [("awq", []), ("awq-gptq", []), ("awq-gptq-attn", []), ("gptq", ["--fake"])])
def test_streaming_calibrated_methods_write_the_in_memory_paths_bytes(tiny_model_dir, tmp_path, method, extra):
    """AWQ (gate included: z = -1 makes it take decisions on this tiny model), AWQ+GPTQ and GPTQ (fake-quantized
    output) quantized from the checkpoint block by block write the same bytes and report as the loaded model."""
    def cfg(out: str):
        c = parse_args(["--model", str(tiny_model_dir), "--out", str(tmp_path / out), "--method", method, "--group-size", "32",
                        "--n-samples", "8", "--seqlen", "64", "--gate-windows", "2", *extra])
        # bf16 on every CPU: the gate's decisions on this tiny model depend on the arithmetic (fp32 on AVX2-only ones)
        c.search = dataclasses.replace(c.search, gate_z=-1.0, compute_dtype=torch.bfloat16)
        return c

    loaded = loaded_model_quantize(cfg("loaded"))
    summary = run(cfg("streamed"), log=lambda m: None, progress=False)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "loaded" / f).read_bytes(), f
    report = json.loads((tmp_path / "streamed" / "quantization_report.json").read_text())
    assert report["layers"] == json.loads(json.dumps(loaded["report"]))
    assert summary.get("clip_gate") == (json.loads(json.dumps(loaded["gate"])) if loaded["gate"] else None)
    if method == "awq":
        assert summary["clip_gate"]["decisions"], "the gate made no decision: the test would check less than it says"


@pytest.mark.parametrize("layers,hidden,extra", [(24, 256, ["--no-clip-gate", "--no-clip"]), (6, 512, ["--gate-cache-size", "0"])])
def test_streaming_awq_memory_does_not_grow_with_the_layers(tmp_path, default_fp16_dir, layers, hidden, extra):
    """AWQ from the checkpoint: the peak RSS of a deeper model is within a margin of the 2-layer one's, where holding
    the extra layers in fp32 would add 3 MB (hidden 256) or 12 MB (512) each, as loading the model does. The gate
    (fewer layers: its tests grow with the square of the depth) keeps no dequantized block here (--gate-cache-size
    0) and re-reads every block from its spill."""
    import shutil

    dirs = {}
    for n in (2, layers):
        dirs[n] = write_random_llama(tmp_path / f"l{n}", n, hidden=hidden, intermediate=hidden * 11 // 4, vocab=49152)  # the default tokenizer's
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(default_fp16_dir / f, dirs[n] / f)
    code = ("from tinyserve_quantize.__main__ import parse_args\nfrom tinyserve_quantize.pipeline import run\n"
            "s = run(parse_args(['--model', '{src}', '--out', '{dst}', '--method', 'awq', '--group-size', '32', '--n-samples', '4', '--seqlen', '32',"
            " '--gate-windows', '1', '--max-shard-size', '1000000'] + " + repr(extra) + "), log=lambda m: None, progress=False)\n"
            "assert ('clip_gate' in s) == ('--no-clip-gate' not in " + repr(extra) + ")")
    rss = {n: peak_rss_mib(code.format(src=dirs[n], dst=tmp_path / f"awq-{n}")) for n in (2, layers)}
    assert rss[layers] - rss[2] < 30.0, rss


def test_device_choice(tiny_llama_dir, tmp_path):
    """--device auto is the CPU here; cuda without a GPU is a one-line error before any work; a bad name is refused."""
    from tinyserve_quantize.blockwise import resolve_device
    from tinyserve_quantize.quantizer import QuantizationError

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(QuantizationError, match="choose auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(QuantizationError, match="no CUDA device"):
            run(parse_args(["--model", str(tiny_llama_dir), "--out", str(tmp_path / "x"), "--device", "cuda"]), log=lambda m: None)
        assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["awq", "awq-gptq", "awq-gptq-attn"])
def test_cuda_quantization_is_as_good_as_the_cpus(tiny_model_dir, tmp_path, method):
    """The same streaming run on the GPU writes the same tensors (names, shapes, dtypes), reports its peak GPU
    memory, and is as close to the unquantized model as the CPU's result. (Its bytes may differ: the GPU's matmuls sum
    in another order, which can move a rounding tie or a search's choice.)"""
    from safetensors.torch import load_file

    from tinyserve_quantize.model_io import load_model

    args = ["--model", str(tiny_model_dir), "--method", method, "--group-size", "32", "--n-samples", "8", "--seqlen", "64", "--gate-windows", "2"]
    summaries = {d: run(parse_args([*args, "--out", str(tmp_path / d), "--device", d]), log=lambda m: None, progress=False) for d in ("cpu", "cuda")}
    assert summaries["cuda"]["device"] == "cuda" and summaries["cuda"]["peak_gpu_gib"] > 0
    cpu, gpu = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cpu", "cuda"))
    assert {k: (v.shape, v.dtype) for k, v in cpu.items()} == {k: (v.shape, v.dtype) for k, v in gpu.items()}
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_model(tiny_model_dir)(input_ids=ids).logits
        err = {d: float((load_model(tmp_path / d)(input_ids=ids).logits - ref).abs().mean()) for d in ("cpu", "cuda")}
    assert err["cuda"] < 1.25 * err["cpu"], err


def test_streaming_reads_sharded_bf16_checkpoints(tiny_qwen2_dir, tmp_path):
    """A bf16 checkpoint in several shards (with an index) streams to the same bytes as the in-memory path."""
    import shutil

    from safetensors.torch import load_file

    from tinyserve_quantize.export import write_tensors

    src = tmp_path / "bf16-sharded"
    src.mkdir()
    for f in tiny_qwen2_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, src / f.name)
    config = read_config(tiny_qwen2_dir)
    config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(tiny_qwen2_dir / "model.safetensors")).items()}
    assert len(write_tensors(src, tensors, max_shard_bytes=200_000)) > 2

    def cfg(out: str):
        return parse_args(["--model", str(src), "--out", str(tmp_path / out), "--method", "awq-gptq", "--group-size", "32",
                           "--n-samples", "8", "--seqlen", "64"])

    loaded_model_quantize(cfg("loaded"))
    run(cfg("streamed"), log=lambda m: None, progress=False)
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == (tmp_path / "loaded" / "model.safetensors").read_bytes()
