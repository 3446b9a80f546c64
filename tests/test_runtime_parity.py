"""The unquantized decoder against transformers: logits (fp32, 1e-4), KV-cached decoding against full forwards,
chunked prefill, batch independence, RoPE/bias variants of the families, and greedy text on the real model."""

import json

import pytest
import torch

from tinyserve.runtime.backends.cuda_graphs import CudaGraphBackend
from tinyserve.runtime.runner import ContextOverflow, ModelRunner, RunnerConfig

ATOL = 1e-4


def fp32_runner(folder, **kw) -> ModelRunner:
    return ModelRunner(folder, RunnerConfig(device="cpu", dtype="float32", lm_head="dense", **kw))


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
@pytest.mark.parametrize("T", [1, 7, 33])
def test_prefill_logits_match_transformers(tiny_model_dir, T):
    runner, ref = fp32_runner(tiny_model_dir, max_seq_len=64), hf_model(tiny_model_dir)
    ids = random_ids(T, T)
    expected = ref(ids[None]).logits[0, -1]
    got = runner.prefill(runner.alloc_slot(), ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_cached_decode_equals_full_forward(tiny_model_dir):
    runner, ref = fp32_runner(tiny_model_dir, max_seq_len=64), hf_model(tiny_model_dir)
    ids = random_ids(20, 1)
    full = ref(ids[None]).logits[0]  # [20, V]: every position from one uncached forward
    slot = runner.alloc_slot()
    torch.testing.assert_close(runner.prefill(slot, ids[:5]), full[4], atol=ATOL, rtol=0)
    for t in range(5, 20):
        got = runner.decode([slot], [int(ids[t])])[0]
        torch.testing.assert_close(got, full[t], atol=ATOL, rtol=0, msg=lambda m: f"position {t}: {m}")
    assert runner.length(slot) == 20


@torch.inference_mode()
def test_chunked_prefill_equals_one_shot(tiny_model_dir):
    runner = fp32_runner(tiny_model_dir, max_seq_len=64, num_slots=2)
    ids = random_ids(30, 2)
    a, b = runner.alloc_slot(), runner.alloc_slot()
    one_shot = runner.prefill(a, ids)
    runner.prefill(b, ids[:11])
    runner.prefill(b, ids[11:17], start=11)
    chunked = runner.prefill(b, ids[17:], start=17)
    torch.testing.assert_close(chunked, one_shot, atol=ATOL, rtol=0)
    # Restarting inside a sequence (reusing a cached prefix) overwrites what came after.
    torch.testing.assert_close(runner.prefill(b, ids[20:], start=20), one_shot, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_batched_decode_rows_do_not_depend_on_each_other(tiny_model_dir):
    """Three sequences of different lengths in slots 2, 0, 3 (not contiguous, not sorted) decoded together give the
    same logits as each decoded alone."""
    runner = fp32_runner(tiny_model_dir, max_seq_len=64, num_slots=4)
    prompts = {s: random_ids(n, 10 + s) for s, n in ((2, 9), (0, 3), (3, 17))}
    slots = [runner.alloc_slot() for _ in range(4)]
    assert slots == [0, 1, 2, 3]
    nxt = {s: int(random_ids(1, 20 + s)) for s in prompts}
    alone = {}
    for s, ids in prompts.items():
        runner.prefill(s, ids)
        alone[s] = runner.decode([s], [nxt[s]])[0]
    for s, ids in prompts.items():  # rewind: the same prompts again, then one batched step
        runner.prefill(s, ids)
    order = [2, 0, 3]
    batched = runner.decode(order, [nxt[s] for s in order])
    for row, s in enumerate(order):
        torch.testing.assert_close(batched[row], alone[s], atol=1e-5, rtol=0)
        assert runner.length(s) == len(prompts[s]) + 1
    # A later batch with explicit positions that agree with the lengths.
    runner.decode([0, 3], [5, 6], positions=[runner.length(0), runner.length(3)])


def _save_tiny(tmp_path, config, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    return tmp_path


def _variant_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, max_position_embeddings=256, initializer_range=0.08)
    if kind == "llama3-rope-biases":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
        return LlamaConfig(**common, attention_bias=True, mlp_bias=True, rope_parameters=rope, tie_word_embeddings=False)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None, head_dim=32)
    if kind == "qwen2-mha":
        return Qwen2Config(**{**common, "num_key_value_heads": 6}, tie_word_embeddings=True)
    raise ValueError(kind)


@torch.inference_mode()
@pytest.mark.parametrize("kind", ["llama3-rope-biases", "mistral", "qwen2-mha"])
def test_family_variants_match_transformers(tmp_path, kind):
    folder = _save_tiny(tmp_path, _variant_config(kind))
    runner, ref = fp32_runner(folder, max_seq_len=128), hf_model(folder)
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(3))  # past llama3's 32-token original context
    full = ref(ids[None]).logits[0]
    slot = runner.alloc_slot()
    torch.testing.assert_close(runner.prefill(slot, ids[:60]), full[59], atol=ATOL, rtol=0)
    for t in range(60, 70):
        torch.testing.assert_close(runner.decode([slot], [int(ids[t])])[0], full[t], atol=ATOL, rtol=0)


def test_slots_and_positions_are_checked(tiny_llama_dir):
    from tinyserve.runtime.kv_cache import NoFreeSlot

    runner = fp32_runner(tiny_llama_dir, max_seq_len=16, num_slots=2)
    a, b = runner.alloc_slot(), runner.alloc_slot()
    with pytest.raises(NoFreeSlot):
        runner.alloc_slot()
    runner.free_slot(a)
    assert runner.alloc_slot() == a  # freed slots are reused
    with pytest.raises(ValueError, match="not allocated"):
        runner.decode([5], [1])
    runner.prefill(a, [1, 2, 3])
    with pytest.raises(ValueError, match="past slot"):
        runner.decode([a], [4], positions=[7])  # would attend to positions never written
    with pytest.raises(ValueError, match="past slot"):
        runner.prefill(b, [1, 2], start=1)  # b is empty
    with pytest.raises(ContextOverflow):
        runner.prefill(b, list(range(17)))
    runner.prefill(b, list(range(15)))
    runner.decode([b], [1])  # position 15: the last one
    with pytest.raises(ContextOverflow):
        runner.decode([b], [1])
    with pytest.raises(ValueError, match="distinct"):
        runner.decode([a, a], [1, 2])


def test_max_seq_len_is_capped_by_the_model(tiny_llama_dir):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    runner = fp32_runner(tiny_llama_dir, max_seq_len=10**6)
    assert runner.max_seq_len == cfg["max_position_embeddings"]


@pytest.mark.slow
@torch.inference_mode()
def test_real_model_greedy_text_matches_transformers(default_fp16_dir):
    """The embedded SmolLM2-135M, unquantized, fp32: 32 greedy tokens identical to transformers on three prompts."""
    from tinyserve.generation.session import GenerationParams, Session
    from tinyserve.generation.sampling import SamplingParams
    from tinyserve.generation.tokenizer import Tokenizer

    runner = fp32_runner(default_fp16_dir, max_seq_len=256)
    tok = Tokenizer(default_fp16_dir, runner.cfg.eos_token_ids)
    session = Session(runner, tok)
    ref = hf_model(default_fp16_dir)
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    ",
        tok.hf.apply_chat_template([{"role": "user", "content": "Name three colors."}], tokenize=False, add_generation_prompt=True),
    ]
    params = GenerationParams(max_tokens=32, sampling=SamplingParams(temperature=0))
    for prompt in prompts:
        ids = tok.encode(prompt, add_special_tokens=False)
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=2)[0, len(ids) :].tolist()
        if expected[-1] in session.eos:  # transformers keeps the EOS token; we stop before it
            expected = expected[:-1]
        text, got = session.generate(ids, params)
        assert got == expected, prompt
        assert text == tok.decode(expected)


class EagerReplay(CudaGraphBackend):
    """The CUDA-graphs backend with capture replaced by an eager rerun into a static output buffer: everything the
    graphs depend on (batch and length buckets, padding rows in the scratch slot, static inputs) runs on CPU."""

    captured: list = []

    def _capture(self, B, L):
        self.captured.append((B, L))
        out = self._decode(B, L)
        return (lambda: out.copy_(self._decode(B, L))), out


@torch.inference_mode()
def test_cuda_graph_bucketing_and_padding_on_cpu(tiny_model_dir):
    from tinyserve.weights import load_weights

    eager = fp32_runner(tiny_model_dir, max_seq_len=300, num_slots=5)
    graphed = fp32_runner(tiny_model_dir, max_seq_len=300, num_slots=5)
    # What plan() builds on CUDA, on the CPU: the graphs backend (one extra cache slot for padding rows).
    weights = load_weights(tiny_model_dir, graphed.cfg, graphed.device, graphed.dtype)
    graphed.backend = EagerReplay(graphed.cfg, weights, graphed.device, graphed.backend.opts)
    assert graphed.cache.k.shape[1] == 6
    EagerReplay.captured = []
    prompts = {0: random_ids(5, 30), 2: random_ids(12, 31), 3: random_ids(270, 32)}
    for r in (eager, graphed):
        for s in range(5):
            r.alloc_slot()
        for s, ids in prompts.items():
            r.prefill(s, ids)
    for step in range(3):
        for order in ([2, 0, 3], [3], [0, 2]):  # buckets of 4 (one padding row), 1 and 2 rows
            toks = [int(random_ids(1, 100 * step + s)) for s in order]
            torch.testing.assert_close(graphed.decode(order, toks), eager.decode(order, toks), atol=1e-4, rtol=0)
    # (batch bucket, attended length): 256 covers slots 0 and 2; with slot 3 (past 256) it is max_seq_len (300).
    assert sorted(set(EagerReplay.captured)) == [(1, 300), (2, 256), (4, 300)]
