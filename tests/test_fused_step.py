"""The fused CPU steps (tinyserve/fused_step.py, tinyserve_kernels/csrc/cpu_decode.cpp): every layer of a decode step or of a
prefill in one C++ call. Checked against model.decode / model.prefill (the same decoder in torch ops) on the tiny Llama
and Qwen2 models (Qwen2: qkv biases, untied lm_head) with INT4 weights, on batches of non-consecutive slots at
different lengths and on prompts on both sides of the dense-GEMM threshold: logits to bf16 rounding, the cache written
only at each row's slot and positions; rows independent of the batch and of the thread count; every kernel build
(engine) this CPU runs; bad input refused; and where the runner uses them.
"""

import re

import pytest
import torch
from native_variants import need, variants
from runtime_helpers import write_rtn_folder

from tinyserve import model
from tinyserve.fused_step import FusedDecoder
from tinyserve.runner import ModelRunner, RunnerConfig

PROMPTS = {0: 9, 1: 3, 2: 15, 3: 6}  # slot -> prompt length


@pytest.fixture
def runner(tiny_int4_dir, monkeypatch, request):
    """A bf16 runner on the tiny INT4 model with our kernels on (any CPU they build on), 4 slots holding prompts."""
    need("native")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "1")
    lm_head = getattr(request, "param", "int8")
    r = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", dtype="bfloat16", lm_head=lm_head, max_seq_len=64, num_slots=4))
    assert r.fused is not None
    g = torch.Generator().manual_seed(3)
    for _ in PROMPTS:
        slot = r.alloc_slot()
        r.prefill(slot, torch.randint(0, r.cfg.vocab_size, (PROMPTS[slot],), generator=g))
    return r


def reference_step(r: ModelRunner, slots: list[int], tokens: list[int], pos: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """model.decode of the same step on copies of the runner's cache: (logits fp32, k cache, v cache) after it."""
    k, v = r.cache.k.clone(), r.cache.v.clone()
    logits = model.decode(r.cfg, r.weights, k, v, torch.tensor(slots), torch.tensor(tokens), torch.tensor(pos), max(pos) + 1, r.cos, r.sin,
                          attention=r.attention)
    return logits.float(), k, v


@torch.inference_mode()
@pytest.mark.parametrize("runner", ["int8", "dense"], indirect=True)
def test_fused_step_tracks_model_decode(runner):
    r = runner
    batches = [[2, 0, 3], [1], [3, 1, 2, 0], [0, 2]]
    tokens = {s: 5 + s for s in PROMPTS}
    for step in range(8):
        slots = batches[step % len(batches)]
        pos = [r.length(s) for s in slots]
        toks = [tokens[s] for s in slots]
        expected, k_ref, v_ref = reference_step(r, slots, toks, pos)
        k_before = r.cache.k.clone()
        got = r.decode(slots, toks)  # the fused step
        assert (got - expected).abs().max() <= 0.01 * expected.abs().max(), step
        # The cache changes only at each row's slot and position (all layers and heads), and holds what model.decode wrote.
        changed = (r.cache.k != k_before).any(dim=(0, 2, 4))  # [slots, S]
        allowed = torch.zeros_like(changed)
        allowed[slots, pos] = True
        assert not (changed & ~allowed).any(), step
        for cache, ref in ((r.cache.k, k_ref), (r.cache.v, v_ref)):
            torch.testing.assert_close(cache.float(), ref.float(), atol=0.01 * ref.float().abs().max().item(), rtol=0)
        tokens.update(zip(slots, got.argmax(-1).tolist()))


@torch.inference_mode()
@pytest.mark.parametrize("T,start", [(5, 0), (40, 0), (7, 9), (40, 15)])
def test_fused_prefill_tracks_model_prefill(runner, T, start):
    """Prompts of up to 32 tokens run our INT4 kernel, longer ones the dense copy (tinyserve_kernels/dispatch.py's choice); from
    position 0 (causal attention) or after cached positions (a mask). Slot 0 holds 9 prompt tokens, slot 2 holds 15."""
    r = runner
    slot = 0 if start <= 9 else 2
    ids = torch.randint(0, r.cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(T))
    k_ref, v_ref = r.cache.k.clone(), r.cache.v.clone()
    expected = model.prefill(r.cfg, r.weights, k_ref, v_ref, slot, ids, start, r.cos, r.sin).float()
    k_before = r.cache.k.clone()
    got = r.fused.prefill(slot, ids, start).float()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()
    changed = (r.cache.k != k_before).any(dim=(0, 2, 4))  # [slots, S]
    assert not changed[[s for s in PROMPTS if s != slot]].any() and not changed[slot, start + T :].any()
    assert not changed[slot, :start].any()
    for cache, ref in ((r.cache.k, k_ref), (r.cache.v, v_ref)):
        torch.testing.assert_close(cache.float(), ref.float(), atol=0.01 * ref.float().abs().max().item(), rtol=0)


@torch.inference_mode()
def test_fused_rows_do_not_depend_on_the_batch_or_threads(runner):
    r = runner
    slots, toks = [3, 0, 2, 1], [7, 8, 9, 10]
    pos = [r.length(s) for s in slots]
    k0, v0 = r.cache.k.clone(), r.cache.v.clone()
    batched = r.fused.decode(slots, toks, pos)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for i in range(len(slots)):
                r.cache.k.copy_(k0), r.cache.v.copy_(v0)
                alone = r.fused.decode(slots[i : i + 1], toks[i : i + 1], pos[i : i + 1])
                assert torch.equal(alone[0], batched[i]), (n, i)
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def test_fused_step_engines_agree(runner):
    """Every AVX-512 build gives the native build's bits (exact integer sums in the linears, the same loops elsewhere);
    the portable build (other summation orders) agrees to bf16 rounding."""
    r = runner
    slots, toks = [2, 0, 3], [11, 12, 13]
    pos = [r.length(s) for s in slots]
    k0, v0 = r.cache.k.clone(), r.cache.v.clone()
    expected = r.fused.decode(slots, toks, pos).float()
    for variant in variants()[1:]:
        k, v = k0.clone(), v0.clone()
        got = FusedDecoder(r.cfg, r.weights, k, v, r.cos, r.sin, variant=variant).decode(slots, toks, pos).float()
        if variant == "portable":
            assert (got - expected).abs().max() <= 0.01 * expected.abs().max()
        else:
            assert torch.equal(got, expected), variant
            assert torch.equal(k, r.cache.k) and torch.equal(v, r.cache.v), variant


@torch.inference_mode()
def test_fused_step_rejects_bad_input(runner):
    step, V = runner.fused.impl, runner.cfg.vocab_size
    t = lambda *xs: torch.tensor(xs, dtype=torch.long)
    cases = {
        "outside the vocabulary": (t(V), t(0), t(3)),
        "slots must be distinct": (t(1, 2), t(0, 0), t(3, 4)),
        "outside the cache's 4 slots": (t(1), t(4), t(3)),
        "outside the context of 64 positions": (t(1), t(0), t(64)),
        "must be [M] int64": (t(1), t(0), torch.tensor([3], dtype=torch.int32)),
    }
    for message, args in cases.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            step.decode(*args)
    prefill_cases = {
        "outside the vocabulary": (t(1, V), 0, 0),
        "outside the cache's 4 slots": (t(1), 4, 0),
        "positions 60..64 are outside the context of 64 positions": (t(1, 2, 3, 4, 5), 0, 60),
        "tokens must be [T] int64": (torch.empty(0, dtype=torch.long), 0, 0),
    }
    for message, args in prefill_cases.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            step.prefill(*args)
    r = runner
    layers = [[lw.attn_norm, lw.qkv.w.native.packed, lw.o.w.native.packed, lw.mlp_norm, lw.gate_up.w.native.packed, lw.down.w.native.packed]
              for lw in r.weights.layers]
    layers[1][1], layers[1][2] = layers[1][2], layers[1][1]  # qkv and o swapped: the packed shapes do not match
    biases = [[None] * 4 for _ in layers]
    with pytest.raises(RuntimeError, match="packed"):
        type(step)(r.weights.embed, layers, biases, biases, r.weights.norm, r.cos, r.sin, r.cache.k, r.cache.v, r.cfg.num_heads,
                   r.cfg.num_kv_heads, r.cfg.intermediate_size, 32, 32, r.cfg.rms_norm_eps)


def test_fused_step_is_used_only_where_it_applies(tiny_int4_dir, tiny_model_dir, tmp_path, monkeypatch):
    """fp32 compute, a decoder linear left unquantized, or our kernels switched off: the runner decodes through
    model.decode (and still works)."""
    need("native")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "1")
    partly_dense = write_rtn_folder(tiny_model_dir, tmp_path / "skip-down", group_size=32, skip=("down_proj",))
    for folder, kw in ((tiny_int4_dir, {"dtype": "float32"}), (partly_dense, {})):
        assert ModelRunner(folder, RunnerConfig(device="cpu", max_seq_len=32, **kw)).fused is None, folder
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "0")
    r = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", max_seq_len=32))
    assert r.fused is None
    slot = r.alloc_slot()
    r.prefill(slot, [5, 6, 7])
    assert r.decode([slot], [8]).shape == (1, r.cfg.vocab_size)


@torch.inference_mode()
def test_fused_step_with_a_context_the_cache_rounds_up(tiny_int4_dir, monkeypatch):
    """serve's batch-invariant runner rounds the cache length up to a multiple of 32; the RoPE tables keep
    max_seq_len rows. The fused step takes both, and refuses positions past the context."""
    need("native")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "1")
    r = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", max_seq_len=45, batch_invariant=True, num_slots=2))
    assert r.fused is not None and r.cache.k.shape[3] == 64 and r.cos.shape[0] == 45
    slot = r.alloc_slot()
    r.prefill(slot, list(range(5, 49)))  # positions 0..43
    expected, _, _ = reference_step(r, [slot], [7], [44])
    got = r.decode([slot], [7])  # position 44, the last one
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()
    with pytest.raises(RuntimeError, match="outside the context of 45 positions"):
        r.fused.decode([slot], [7], [45])
