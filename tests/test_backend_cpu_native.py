"""The cpu-native backend (tinyserve/runtime/backends/cpu_native.py, tinyserve_kernels/csrc/cpu_decode.cpp): every layer of a
step in one C++ call. Checked against the reference forward (model.reference_step) run on the backend's own converted
weights (NativeInt4Linear, NativeInt8Linear: the same kernels, called from torch) and on copies of its cache, on the
tiny Llama and Qwen2 models (Qwen2: qkv biases, untied lm_head) with INT4 weights: decode batches of non-consecutive
slots at different lengths, prompts on both sides of the dense threshold (NATIVE_MAX_ROWS) and a batch mixing both;
logits to bf16 rounding, the cache written only at each row's slot and positions and holding what the reference wrote.
Then: rows independent of the batch and of the thread count; every kernel build (engine) this CPU runs; bad input
refused; where the planner picks it; and the context limit.
"""

import re

import pytest
import torch
from native_variants import need, variants
from runtime_helpers import write_rtn_folder

from tinyserve import model
from tinyserve.runtime.backends import cpu_kernels_usable
from tinyserve.runtime.backends.cpu_native import NATIVE_MAX_ROWS, CpuNativeBackend, NativeInt4Linear
from tinyserve.model import SeqChunk
from tinyserve.runtime.runner import ContextOverflow, ModelRunner, RunnerConfig
from tinyserve.weights import load_weights

PROMPTS = {0: 9, 1: 3, 2: 15, 3: 6}  # slot -> prompt length
CPU = torch.device("cpu")


@pytest.fixture
def runner(tiny_int4_dir, monkeypatch, request):
    """A bf16 runner on the tiny INT4 model with our kernels on (any CPU they build on), 4 slots holding prompts."""
    need("native")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "1")
    lm_head = getattr(request, "param", "int8")
    r = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", dtype="bfloat16", lm_head=lm_head, max_seq_len=64, num_slots=4))
    assert r.backend.name == "cpu-native"
    assert all(isinstance(getattr(lw, name), NativeInt4Linear) for lw in r.weights.layers for name in lw.linears())
    g = torch.Generator().manual_seed(3)
    for _ in PROMPTS:
        slot = r.alloc_slot()
        r.prefill(slot, torch.randint(0, r.cfg.vocab_size, (PROMPTS[slot],), generator=g))
    return r


def reference(r: ModelRunner, seqs: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference forward of the same step, on the backend's weights and on copies of its cache: (logits fp32, k
    cache, v cache) after it."""
    k, v = r.cache.k.clone(), r.cache.v.clone()
    logits = model.reference_step(r.cfg, r.weights, k, v, seqs, r.backend.cos, r.backend.sin)
    return logits.float(), k, v


# bf16 rounding, relative to the largest logit. The reference's decode attention is torch's SDPA flash kernel in bf16,
# the C++ decoder's is ours (fp32 inside): they round differently, by up to ~1.2% of the largest logit on these random
# models (0.0586 of 5.0 measured); a packing, RoPE or cache bug moves logits by far more.
TOL = 0.02


def check_step(r: ModelRunner, seqs: list[SeqChunk], got: torch.Tensor, before: tuple[torch.Tensor, torch.Tensor],
               ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor], what) -> None:
    """Logits to bf16 rounding; the cache changed only at each chunk's slot and positions (all layers and heads), and
    holding what the reference wrote (to bf16 rounding)."""
    expected, k_ref, v_ref = ref
    assert got.shape == expected.shape, what
    assert (got - expected).abs().max() <= TOL * expected.abs().max(), what
    changed = ((r.cache.k != before[0]) | (r.cache.v != before[1])).any(dim=(0, 2, 4))  # [slots, S]
    allowed = torch.zeros_like(changed)
    for s in seqs:
        allowed[s.slot, s.start : s.start + len(s.tokens)] = True
    assert not (changed & ~allowed).any(), what
    for cache, ref_cache in ((r.cache.k, k_ref), (r.cache.v, v_ref)):
        torch.testing.assert_close(cache.float(), ref_cache.float(), atol=0.01 * ref_cache.float().abs().max().item(), rtol=0)


def snapshot(r: ModelRunner) -> tuple[torch.Tensor, torch.Tensor]:
    return r.cache.k.clone(), r.cache.v.clone()


def restore(r: ModelRunner, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
    r.cache.k.copy_(saved[0])
    r.cache.v.copy_(saved[1])


@torch.inference_mode()
@pytest.mark.parametrize("runner", ["int8", "dense"], indirect=True)
def test_decode_steps_track_the_reference(runner):
    r = runner
    batches = [[2, 0, 3], [1], [3, 1, 2, 0], [0, 2]]
    tokens = {s: 5 + s for s in PROMPTS}
    for step in range(8):
        slots = batches[step % len(batches)]
        seqs = [SeqChunk(s, r.length(s), [tokens[s]]) for s in slots]
        ref = reference(r, seqs)
        before = snapshot(r)
        got = r.decode(slots, [tokens[s] for s in slots])  # the backend's step: Decoder::decode
        check_step(r, seqs, got, before, ref, step)
        tokens.update(zip(slots, got.argmax(-1).tolist()))


@torch.inference_mode()
@pytest.mark.parametrize("T,start", [(5, 0), (40, 0), (7, 9), (40, 15)])
def test_prefill_tracks_the_reference(runner, T, start):
    """Prompts of up to NATIVE_MAX_ROWS tokens run our INT4 kernel, longer ones the dense copy; from position 0 (causal
    attention) or after cached positions (a mask). Slot 0 holds 9 prompt tokens, slot 2 holds 15."""
    r = runner
    assert 7 <= NATIVE_MAX_ROWS < 40
    assert all(getattr(lw, name).dense is not None for lw in r.weights.layers for name in lw.linears())  # the tiny model fits
    slot = 0 if start <= 9 else 2
    ids = torch.randint(0, r.cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(T)).tolist()
    seqs = [SeqChunk(slot, start, ids)]
    ref = reference(r, seqs)
    before = snapshot(r)
    got = r.step(seqs)  # Decoder::prefill
    check_step(r, seqs, got, before, ref, (T, start))


@torch.inference_mode()
@pytest.mark.parametrize("T", [5, 40])
def test_a_step_mixing_prompts_and_decode_rows(runner, T):
    """Two decode rows and a prompt chunk after cached positions, in slots out of order: the step gives, bit for bit, the
    logits and cache of running each chunk alone, and tracks the reference forward of the whole batch.

    With T = 40 the batch has more rows than NATIVE_MAX_ROWS: the reference's linears (called once for all rows) would
    put the decode rows through the dense copy, while the backend runs each decode row through our INT4 kernel (a
    different rounding of the same weights, ~1% of the largest logit here). There the reference runs chunk by chunk,
    each with the kernels the backend uses for it."""
    r = runner
    ids = torch.randint(0, r.cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(T + 1)).tolist()
    seqs = [SeqChunk(3, PROMPTS[3], [7]), SeqChunk(1, PROMPTS[1], ids), SeqChunk(0, PROMPTS[0], [8])]
    if T + 2 <= NATIVE_MAX_ROWS:
        ref = reference(r, seqs)
    else:
        k, v = r.cache.k.clone(), r.cache.v.clone()  # the chunks write disjoint slots: one pair of copies serves all
        logits = [model.reference_step(r.cfg, r.weights, k, v, [s], r.backend.cos, r.backend.sin) for s in seqs]
        ref = (torch.cat(logits).float(), k, v)
    before = snapshot(r)
    got = r.step(seqs)
    check_step(r, seqs, got, before, ref, T)
    after = snapshot(r)
    restore(r, before)
    alone = torch.cat([r.backend.step([s]) for s in seqs])
    assert torch.equal(alone, got)
    assert torch.equal(r.cache.k, after[0]) and torch.equal(r.cache.v, after[1])


@torch.inference_mode()
def test_rows_do_not_depend_on_the_batch_or_threads(runner):
    r = runner
    seqs = [SeqChunk(s, PROMPTS[s], [t]) for s, t in zip([3, 0, 2, 1], [7, 8, 9, 10])]
    before = snapshot(r)
    batched = r.backend.decode(seqs)  # [M, H] final hidden states
    assert batched.shape == (4, r.cfg.hidden_size)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for i in range(len(seqs)):
                restore(r, before)
                alone = r.backend.decode(seqs[i : i + 1])
                assert torch.equal(alone[0], batched[i]), (n, i)
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def test_engines_agree(runner):
    """Every AVX-512 build gives the native build's bits (exact integer sums in the linears, the same loops elsewhere);
    the portable build (other summation orders) agrees to bf16 rounding. Each build gets a backend of its own, on fresh
    weights and a copy of the runner's cache."""
    r = runner
    names = variants()
    if len(names) < 2:
        pytest.skip("fewer than two engines can be built on this CPU")
    seqs = [SeqChunk(2, PROMPTS[2], [11]), SeqChunk(0, PROMPTS[0], [12]), SeqChunk(3, PROMPTS[3], [13])]
    before = snapshot(r)
    expected = r.backend.decode(seqs).float()
    for variant in names:  # native too: a fresh backend must reproduce the runner's own bits
        b = CpuNativeBackend(r.cfg, load_weights(r.model_dir, r.cfg, CPU, torch.bfloat16), CPU, r.backend.opts, variant=variant)
        b.cache.k.copy_(before[0])
        b.cache.v.copy_(before[1])
        got = b.decode(seqs).float()
        if variant == "portable":
            assert (got - expected).abs().max() <= TOL * expected.abs().max()
        else:
            assert torch.equal(got, expected), variant
            assert torch.equal(b.cache.k, r.cache.k) and torch.equal(b.cache.v, r.cache.v), variant


@torch.inference_mode()
def test_bad_input_is_rejected(runner):
    r = runner
    dec, V = r.backend.decoder, r.cfg.vocab_size
    t = lambda *xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    cases = {
        "outside the vocabulary": (t(V), t(0), t(3)),
        "each (slot, position) may appear once in a step": (t(1, 2), t(0, 0), t(3, 3)),
        "outside the cache's 4 slots": (t(1), t(4), t(3)),
        "outside the context of 64 positions": (t(1), t(0), t(64)),
        "must be [M] int64": (t(1), t(0), torch.tensor([3], dtype=torch.int32)),
    }
    for message, args in cases.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            dec.decode(*args)
    prefill_cases = {
        "outside the vocabulary": (t(1, V), 0, 0),
        "outside the cache's 4 slots": (t(1), 4, 0),
        "positions 60..64 are outside the context of 64 positions": (t(1, 2, 3, 4, 5), 0, 60),
        "tokens must be [T] int64": (torch.empty(0, dtype=torch.long), 0, 0),
    }
    for message, args in prefill_cases.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            dec.prefill(*args)
    w = r.weights
    layers = [[lw.attn_norm, lw.qkv.w.packed, lw.o.w.packed, lw.mlp_norm, lw.gate_up.w.packed, lw.down.w.packed] for lw in w.layers]
    biases = [[None] * 4 for _ in layers]
    args = (w.embed, layers, biases, biases, w.norm, r.backend.cos, r.backend.sin, r.cache.k, r.cache.v, r.cfg.num_heads,
            r.cfg.num_kv_heads, r.cfg.intermediate_size, w.layers[0].qkv.w.group_size, NATIVE_MAX_ROWS, r.cfg.rms_norm_eps)
    type(dec)(*args)  # the untouched arguments are accepted
    layers[1][1], layers[1][2] = layers[1][2], layers[1][1]  # qkv and o swapped: the packed shapes do not match
    with pytest.raises(RuntimeError, match="packed"):
        type(dec)(*args)


def test_used_only_where_it_applies(tiny_int4_dir, tiny_model_dir, tmp_path, monkeypatch):
    """fp32 compute, a decoder linear left unquantized, or our kernels switched off: the planner picks the eager backend
    (which still works); auto picks cpu-native exactly where the kernels are usable under auto."""
    need("native")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "1")
    partly_dense = write_rtn_folder(tiny_model_dir, tmp_path / "skip-down", group_size=32, skip=("down_proj",))
    for folder, kw in ((tiny_int4_dir, {"dtype": "float32"}), (partly_dense, {})):
        assert ModelRunner(folder, RunnerConfig(device="cpu", max_seq_len=32, **kw)).backend.name == "eager", folder
    assert ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", max_seq_len=32)).backend.name == "cpu-native"
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "auto")
    auto = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", max_seq_len=32)).backend.name
    assert auto == ("cpu-native" if cpu_kernels_usable("auto") else "eager")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "0")
    r = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", max_seq_len=32))
    assert r.backend.name == "eager"
    slot = r.alloc_slot()
    r.prefill(slot, [5, 6, 7])
    assert r.decode([slot], [8]).shape == (1, r.cfg.vocab_size)


@torch.inference_mode()
def test_the_last_position_of_the_context(tiny_int4_dir, monkeypatch):
    """The batch-invariant runner's cache holds exactly max_seq_len positions (no rounding up), like the RoPE tables;
    the step at the last position tracks the reference, and positions past the context are refused."""
    need("native")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "1")
    r = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", max_seq_len=45, batch_invariant=True, num_slots=2))
    assert r.backend.name == "cpu-native"
    assert r.cache.k.shape[3] == 45 and r.backend.cos.shape[0] == 45 and r.backend.sin.shape[0] == 45
    slot = r.alloc_slot()
    r.prefill(slot, list(range(5, 49)))  # positions 0..43
    seqs = [SeqChunk(slot, 44, [7])]
    ref = reference(r, seqs)
    before = snapshot(r)
    got = r.decode([slot], [7])  # position 44, the last one
    check_step(r, seqs, got, before, ref, 44)
    t = lambda *xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    with pytest.raises(RuntimeError, match="outside the context of 45 positions"):
        r.backend.decoder.decode(t(7), t(slot), t(45))
    with pytest.raises(RuntimeError, match=re.escape("positions 44..45 are outside the context of 45 positions")):
        r.backend.decoder.prefill(t(7, 8), slot, 44)
    with pytest.raises(ContextOverflow):
        r.decode([slot], [7])


@pytest.mark.parametrize("cuts", [(41,), (7, 13, 21), (1,) * 41, (16, 1, 1, 23)])
@torch.inference_mode()
def test_position_invariant_kv_and_logits_whatever_the_chunks(tiny_int4_dir, monkeypatch, cuts):
    """With position_invariant, a prompt prefilled in one chunk, in chunks of other lengths, or decoded one token at a
    time leaves the same bits in the cache and gives the same logits for its last token; the reference forward agrees
    to bf16 rounding. A mixed step (a prompt chunk beside decode rows) gives each row what it gives alone."""
    need("native")
    monkeypatch.setenv("TINYSERVE_CPU_KERNEL", "1")
    r = ModelRunner(tiny_int4_dir, RunnerConfig(device="cpu", dtype="bfloat16", max_seq_len=64, num_slots=3, batch_invariant=True,
                                                position_invariant=True))
    assert r.position_invariant
    prompt = torch.randint(0, r.cfg.vocab_size, (41,), generator=torch.Generator().manual_seed(5)).tolist()
    a, b = r.alloc_slot(), r.alloc_slot()
    whole = r.prefill(a, prompt)
    start = 0
    for n in cuts:
        last = r.prefill(b, prompt[start : start + n], start)
        start += n
    assert torch.equal(last, whole)
    assert torch.equal(r.cache.k[:, b, :, :41], r.cache.k[:, a, :, :41]) and torch.equal(r.cache.v[:, b, :, :41], r.cache.v[:, a, :, :41])
    expected = reference(r, [SeqChunk(a, 0, prompt)])[0][0]
    assert (whole - expected).abs().max() <= TOL * expected.abs().max()
    # a chunk of slot a's continuation beside a decode row of slot b, against each alone
    c = r.alloc_slot()
    r.prefill(c, prompt[:30])
    before = snapshot(r)
    both = r.step([SeqChunk(a, 41, [5, 6, 7]), SeqChunk(c, 30, [prompt[30]])])
    after = snapshot(r)
    restore(r, before)
    assert torch.equal(r.step([SeqChunk(a, 41, [5, 6, 7])])[0], both[0])
    assert torch.equal(r.step([SeqChunk(c, 30, [prompt[30]])])[0], both[1])
    assert torch.equal(r.cache.k, after[0]) and torch.equal(r.cache.v, after[1])
