"""Tiny end-to-end runs on random-weight Llama and Qwen2 folders: quantize (AWQ, RTN, fake), read the files back with
an unpacker written independently of tinyserve_kernels.layout, evaluate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tinyserve_quantize.awq import dequantize_into
from tinyserve_quantize.methods import quantize_model
from tinyserve_quantize.evaluate import evaluate_folder
from tinyserve_quantize.model_families import family_for
from tinyserve_quantize.model_io import load_model, read_config
from tinyserve_quantize.pipeline import QuantizeConfig, run
from tinyserve_quantize.quantizer import QuantSpec
from tinyserve_quantize.text_data import eval_text

REPO = Path(__file__).resolve().parents[1]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMALL_CALIB = dict(n_samples=8, seqlen=64)


def independent_dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, G: int) -> torch.Tensor:
    """The AutoAWQ GEMM layout read straight from its definition: column 8j + c of a word sits at bits
    4 * (c // 2) + 16 * (c % 2). Returns W [K, N] in fp32."""

    def unpack(words):
        u = words.to(torch.int64) & 0xFFFFFFFF
        cols = [(u >> (4 * (c // 2) + 16 * (c % 2))) & 0xF for c in range(8)]
        return torch.stack(cols, dim=-1).flatten(-2)  # [R, N]

    q, z = unpack(qweight), unpack(qzeros)
    group = torch.arange(qweight.shape[0]) // G
    return (q - z[group]).double().mul(scales.double()[group]).float()


def read(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model_dir):
    """AWQ packed and AWQ fake-quant folders of one tiny model (both runs see the same calibration)."""
    base = tmp_path_factory.mktemp("e2e")
    packed = base / "awq"
    fake = base / "awq-fake"
    summary = run(QuantizeConfig(tiny_model_dir, packed, method="awq", **SMALL_CALIB), log=lambda m: None, progress=False)
    run(QuantizeConfig(tiny_model_dir, fake, method="awq", fake=True, **SMALL_CALIB), log=lambda m: None, progress=False)
    return tiny_model_dir, packed, fake, summary


def test_packed_folder_layout_and_config(tiny_runs):
    src, packed, _, summary = tiny_runs
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm", "modules_to_not_convert": None,
    }
    tensors = read(packed)
    src_config = json.loads((src / "config.json").read_text())
    H, I = src_config["hidden_size"], src_config["intermediate_size"]
    for layer in range(src_config["num_hidden_layers"]):
        for name in LINEARS:
            mod = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"model.layers.{layer}.{mod}.{name}"
            qw, qz, s = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"]
            K = I if name == "down_proj" else H
            assert qw.dtype == torch.int32 and qz.dtype == torch.int32 and s.dtype == torch.float16
            assert qw.shape[0] == K and qz.shape[0] == K // 64 and s.shape == (K // 64, qw.shape[1] * 8)
            assert f"{prefix}.weight" not in tensors
            has_bias = src_config["model_type"] == "qwen2" and name in ("q_proj", "k_proj", "v_proj")
            assert (f"{prefix}.bias" in tensors) == has_bias
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (packed / f).read_bytes() == (src / f).read_bytes()
    report = json.loads((packed / "quantization_report.json").read_text())
    assert len(report["layers"]) == 7 * src_config["num_hidden_layers"]
    assert (packed / "quantization_report.png").stat().st_size > 1000
    assert summary["calibration"]["tokens"] == 8 * 64 and summary["peak_rss_gib"] > 0
    # On held-out calibration windows, AWQ's total output error is below RTN's.
    assert summary["sum_mse_awq"] < summary["sum_mse_rtn"]


def test_independent_dequant_matches_fake_quant_folder(tiny_runs):
    """The packed files, read without tinyserve_kernels.layout, hold exactly the weights the fake-quant run wrote."""
    _, packed, fake, _ = tiny_runs
    p, f = read(packed), read(fake)
    n = 0
    for key in p:
        if key.endswith(".qweight"):
            prefix = key[: -len(".qweight")]
            W = independent_dequant(p[key], p[prefix + ".qzeros"], p[prefix + ".scales"], 64)  # [K, N]
            torch.testing.assert_close(W.t(), f[prefix + ".weight"].float(), rtol=1e-3, atol=1e-4)
            n += 1
        elif not key.endswith((".qzeros", ".scales")):
            assert torch.equal(p[key], f[key]), key  # norms (with folded scales), embeddings, biases
    assert n == 14


@torch.no_grad()
def test_quantized_model_stays_close_to_the_original(tiny_runs):
    """Logits of the packed AWQ model (read back through load_model) against the fp16 original, and against RTN of
    the same model. Random weights are far more sensitive to 4 bits than trained ones (RTN moves the logits by ~37%
    here), so the check is "close, and no worse than RTN"."""
    src, packed, _, _ = tiny_runs
    original, quantized, rtn = load_model(src), load_model(packed), load_model(src)
    family = family_for(read_config(src))
    dequantize_into(rtn, quantize_model("rtn", rtn, family, QuantSpec(4, 64), None, progress=False), 64)
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = original(input_ids=ids).logits
    err_awq = float((quantized(input_ids=ids).logits - ref).norm() / ref.norm())
    err_rtn = float((rtn(input_ids=ids).logits - ref).norm() / ref.norm())
    assert 0 < err_awq < 0.5 and err_awq <= 1.02 * err_rtn, (err_awq, err_rtn)


@pytest.mark.parametrize("bits,group", [(3, 64), (4, -1), (4, 32)])
def test_rtn_bits_and_group_sizes(tmp_path, tiny_llama_dir, bits, group):
    out = tmp_path / "rtn"
    run(QuantizeConfig(tiny_llama_dir, out, method="rtn", w_bit=bits, group_size=group), log=lambda m: None, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["bits"] == bits and q["group_size"] == group
    t = read(out)
    qw, qz, s = (t[f"model.layers.1.mlp.down_proj.{k}"] for k in ("qweight", "qzeros", "scales"))
    K = qw.shape[0]
    G = K if group == -1 else group
    assert s.shape[0] == K // G
    W = independent_dequant(qw, qz, s, G)
    codes = independent_dequant(qw, torch.zeros_like(qz), torch.ones_like(s), G)
    assert int(codes.max()) <= 2**bits - 1  # 3-bit codes in 4-bit containers
    original = load_model(tiny_llama_dir).model.layers[1].mlp.down_proj.weight.t()
    step = s.float().repeat_interleave(G, 0)
    assert ((W - original).abs() <= step * 0.52 + 1e-4).all()  # RTN: within half a step (+ fp16 rounding)


def test_evaluate_cli_json(tmp_path, tiny_qwen2_dir):
    packed = tmp_path / "rtn"
    run(QuantizeConfig(tiny_qwen2_dir, packed, method="rtn"), log=lambda m: None, progress=False)
    r = subprocess.run(
        [sys.executable, "-m", "tinyserve_quantize.evaluate", "--model", str(packed), "--ctx", "64", "--max-tokens", "256", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == 4 * 63 and out["ppl"] > 1
    assert out["ppl"] == pytest.approx(evaluate_folder(packed, eval_text(), ctx=64, max_tokens=256)["ppl"], rel=1e-4)


def test_ensure_quantized_default_quantizes_once_then_uses_the_cache(tmp_path, monkeypatch, tiny_llama_dir):
    """ensure_quantized_default's caching, with the tiny model standing in for the default one (the real model's first
    quantization takes about a minute and is what `python -m tinyserve_quantize.table` shows)."""
    from tinyserve_quantize import default_model

    monkeypatch.setenv("TINYSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(default_model, "ensure_fp16_default", lambda log: tiny_llama_dir)
    monkeypatch.setattr("tinyserve_quantize.pipeline.calib_text", lambda: eval_text()[:12000])  # a few windows: keep it quick
    models = tmp_path / "models"
    stale = models / "SmolLM2-135M-Instruct-awq-w4-g64-r4"  # written by an older version of the quantizer: removed
    other = models / f"SmolLM2-135M-Instruct-rtn-w4-g64-r{default_model.RECIPE_VERSION}"  # another current recipe: kept
    for folder in (stale, other):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    messages = []
    first = default_model.ensure_quantized_default(log=messages.append)
    recipe = default_model.DEFAULT_RECIPE
    assert first == models / f"SmolLM2-135M-Instruct-{recipe.name}-r{default_model.RECIPE_VERSION}"
    assert not stale.exists() and other.exists()
    assert json.loads((first / "config.json").read_text())["quantization_config"]["group_size"] == recipe.group_size
    assert any("quantizing the default model" in m for m in messages)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    messages.clear()
    assert default_model.ensure_quantized_default(log=messages.append) == first
    assert messages == [] and (first / "model.safetensors").stat().st_mtime_ns == stamp
