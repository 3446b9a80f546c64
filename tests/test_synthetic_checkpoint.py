"""scripts/make_synthetic_checkpoint.py: a sharded random Llama folder that transformers and our runtime both load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_synthetic_checkpoint.py"
SHARD_GB = "0.00005"  # 50 kB: tiny-2's ~72 kB layers split across shards, the 6 MB embedding gets its own


def make(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), "--preset", "tiny-2", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "tiny-2"
    r = make(out, "--shard-gb", SHARD_GB)
    assert r.returncode == 0, r.stderr
    assert "2 layers" in r.stdout and "peak RSS" in r.stdout
    return out


def test_shards_and_index_cover_every_tensor(tiny):
    from safetensors import safe_open

    shards = sorted(tiny.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tiny / "model.safetensors").exists()
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    stored = {}
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                assert t.dtype == torch.float16
                stored[name] = (path.name, t.numel() * 2)
    assert index["weight_map"] == {name: file for name, (file, _) in stored.items()}
    assert index["metadata"]["total_size"] == sum(n for _, n in stored.values())
    layer = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    assert set(stored) == layer | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tiny / name).is_file()


def test_transformers_and_runtime_load_it(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyserve.config import ModelConfig
    from tinyserve.runtime.runner import ModelRunner, RunnerConfig

    cfg = ModelConfig.load(tiny)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.vocab_size) == (2, 64, 2, 49152)
    ids = AutoTokenizer.from_pretrained(tiny)("The quick brown fox jumps over the lazy dog.")["input_ids"]
    assert max(ids) < cfg.vocab_size
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1]
    assert torch.isfinite(ref).all() and ref.std() > 0.1  # unit-scale logits, not collapsed to zero

    runner = ModelRunner(tiny, RunnerConfig(device="cpu", dtype="float32"))
    logits = runner.prefill(runner.alloc_slot(), ids)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.reshape(-1).float(), ref, rtol=1e-3, atol=1e-3)


def test_same_seed_same_bytes(tiny, tmp_path):
    again = tmp_path / "again"
    assert make(again, "--shard-gb", SHARD_GB).returncode == 0
    files = sorted(p.name for p in tiny.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "seed1"
    assert make(other, "--seed", "1").returncode == 0
    assert (other / "model.safetensors").is_file()  # one shard at the default 2 GB
    assert not (other / "model.safetensors.index.json").exists()


def test_existing_folder_needs_force(tiny):
    before = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}
    r = make(tiny)
    assert r.returncode == 2
    assert "not empty" in r.stderr and "--force" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == before
    assert not list(tiny.parent.glob(".tiny-2.tmp-*"))  # nothing left half-written
