"""Generation behaviour: stop strings across tokens, UTF-8 across tokens, sampling filters, penalties, seeds,
logprobs, EOS from generation_config, context overflow, prefix reuse between calls, interrupted streams."""

import io
import json
import math
import shutil

import pytest
import torch

from tinyserve.cli.chat import Chat, ChatConfig
from tinyserve.generation.scheduler import SchedulerConfig
from tinyserve.generation.session import GenerationParams, Session
from tinyserve.runtime.runner import ContextOverflow, ModelRunner, RunnerConfig
from tinyserve.generation.sampling import SamplingError, SamplingParams, SequenceSampler, sample
from tinyserve.generation.tokenizer import IncrementalDetokenizer, StopStrings, Tokenizer

from native_variants import need
from runtime_helpers import write_rtn_folder

GREEDY = SamplingParams(temperature=0)


def session_for(folder, max_seq_len=128, dtype="float32", config: SchedulerConfig = SchedulerConfig()) -> Session:
    runner = ModelRunner(folder, RunnerConfig(device="cpu", dtype=dtype, max_seq_len=max_seq_len))
    return Session(runner, Tokenizer(folder, runner.cfg.eos_token_ids), config)


@pytest.fixture(scope="module")
def invariant_session(tmp_path_factory, tiny_llama_dir):
    """Sessions on the runner `chat` and `generate` build on CPU: INT4 on the cpu-native backend, position-invariant
    (one thread, restored afterwards)."""
    need("native")
    folder = write_rtn_folder(tiny_llama_dir, tmp_path_factory.mktemp("tiny-int4"), group_size=64)
    threads = torch.get_num_threads()

    def make(max_seq_len=256) -> Session:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TINYSERVE_CPU_KERNEL", "1")
            runner = ModelRunner(folder, RunnerConfig(device="cpu", max_seq_len=max_seq_len, position_invariant=True, threads=1))
        assert runner.position_invariant
        return Session(runner, Tokenizer(folder, runner.cfg.eos_token_ids))

    yield make
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(default_fp16_dir) -> Tokenizer:
    return Tokenizer(default_fp16_dir)


# ---- text: stop strings and UTF-8 --------------------------------------------------------------------------------


def test_stop_strings_split_across_pushes():
    s = StopStrings(["</end>", "STOP"])
    assert s.push("Hello </") == "Hello "  # "</" could start "</end>": held back
    assert s.push("e") == ""
    assert s.push("nd> more") == ""
    assert s.stopped


def test_stop_strings_release_false_starts_and_pick_the_earliest():
    s = StopStrings(["abcd"])
    assert s.push("xab") == "x"
    assert s.push("cX") == "abcX"  # "abcX" can no longer become "abcd"
    assert not s.stopped and s.flush() == ""
    s = StopStrings(["lo", "hel"])
    assert s.push("ahello") == "a" and s.stopped  # "hel" starts before "lo"
    s = StopStrings([])
    assert s.push("anything") == "anything"


def test_incremental_detokenizer_never_emits_broken_utf8(tok):
    text = "Llamas 🦙 and deer 鹿, naïve café 👋🏽 — 日本語のテキスト 🎉!"
    ids = tok.encode(text, add_special_tokens=False)
    # The test means something only if some token boundary splits a character.
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Animals:", add_special_tokens=False))
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_detokenizer_keeps_leading_spaces_after_the_prompt(tok):
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    reply = tok.encode(" Paris, of course.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(detok.push(t) for t in reply) + detok.flush() == " Paris, of course."


@torch.inference_mode()
def test_stop_string_across_tokens_never_leaks(tiny_llama_dir):
    session = session_for(tiny_llama_dir)
    prompt = session.tok.encode("Once upon a time")
    params = GenerationParams(max_tokens=24, ignore_eos=True, sampling=GREEDY)
    pieces = [c.text for c in session.stream(prompt, params)]
    full = "".join(pieces)
    # A stop string made of the end of one token's text and the start of the next one's, first occurring there.
    ends = [sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))]
    cut = next(e for e in ends[2:] if 0 < e < len(full) and full.find(full[e - 2 : e + 2]) == e - 2 and len(full[e - 2 : e + 2]) == 4)
    stop = full[cut - 2 : cut + 2]
    chunks = list(session.stream(prompt, GenerationParams(max_tokens=24, ignore_eos=True, stop=(stop,), sampling=GREEDY)))
    text = "".join(c.text for c in chunks)
    assert text == full[: cut - 2]
    assert chunks[-1].finish_reason == "stop" and stop not in text


# ---- sampling ----------------------------------------------------------------------------------------------------


def draws(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    s = SequenceSampler(params, [], logits.shape[-1])
    return [s.draw(logits) for _ in range(n)]


def test_filters_only_sample_allowed_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert set(draws(SamplingParams(top_k=2, seed=0), logits, 300)) == {0, 1}
    assert set(draws(SamplingParams(top_p=0.7, seed=0), logits, 300)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(SamplingParams(min_p=0.2, seed=0), logits, 300)) == {0, 1, 2}  # >= 0.2 * 0.5
    assert set(draws(SamplingParams(top_k=3, top_p=0.6, seed=0), logits, 300)) == {0, 1}  # top-p over the top-3
    assert draws(SamplingParams(temperature=0), logits, 1) == [0]
    assert draws(SamplingParams(top_k=1, seed=0), logits, 5) == [0] * 5


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    got = torch.bincount(torch.tensor(draws(SamplingParams(seed=1), probs.log(), 3000)), minlength=3) / 3000
    assert torch.allclose(got, probs, atol=0.04), got
    # Temperature 0.5 squares the odds: p ~ [25, 9, 4] / 38.
    got = torch.bincount(torch.tensor(draws(SamplingParams(temperature=0.5, seed=2), probs.log(), 3000)), minlength=3) / 3000
    assert torch.allclose(got, torch.tensor([25, 9, 4]) / 38, atol=0.04), got


def test_top_p_on_a_large_vocabulary_grows_its_candidate_set():
    # 1000 slowly decreasing probabilities: top_p=0.5 needs ~470 candidates (more than the first 64 examined).
    logits = -torch.arange(1000, dtype=torch.float32) * 0.001
    probs = torch.softmax(logits, 0)
    allowed = int((torch.cumsum(probs, 0) - probs < 0.5).sum())
    assert allowed > 64
    got = draws(SamplingParams(top_p=0.5, seed=3), logits, 2000)
    assert max(got) < allowed and max(got) > 0.9 * allowed


def test_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.1])
    s = SequenceSampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], vocab_size=4)
    assert s.penalize(logits).tolist() == pytest.approx([1.0, -2.0, 0.5, 0.1])  # seen tokens: positive / p, negative * p
    s = SequenceSampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[3], vocab_size=4)
    s.observe(2)
    s.observe(2)
    s.observe(0)
    assert s.penalize(logits).tolist() == pytest.approx([2.0 - 0.25 - 0.5, -1.0, 0.5 - 0.5 - 0.5, 0.1])  # prompt not counted
    # Greedy with a repetition penalty avoids the token it already produced.
    s = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=10.0), prompt_ids=[], vocab_size=4)
    logits = torch.tensor([2.0, -1.0, 0.5, 0.4])
    assert [sample(logits, [s])[0].token for _ in range(3)] == [0, 2, 3]


def test_invalid_parameters_are_refused():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-1), dict(repetition_penalty=0),
                dict(presence_penalty=3), dict(top_logprobs=50)):
        with pytest.raises(SamplingError):
            SamplingParams(**bad)


def test_logprobs_and_batch_rows_are_independent():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    params = [SamplingParams(seed=5, logprobs=True, top_logprobs=4), SamplingParams(temperature=0), SamplingParams(seed=9, top_p=0.8)]
    batched = sample(logits, [SequenceSampler(p, [], 50) for p in params])
    alone = [sample(logits[m], [SequenceSampler(p, [], 50)])[0] for m, p in enumerate(params)]
    assert [r.token for r in batched] == [r.token for r in alone]
    lp = torch.log_softmax(logits[0], -1)
    r = batched[0]
    assert r.logprob == pytest.approx(float(lp[r.token]))
    assert [t for t, _ in r.top_logprobs] == lp.topk(4).indices.tolist()
    assert all(a >= b for (_, a), (_, b) in zip(r.top_logprobs, r.top_logprobs[1:]))
    assert batched[1].token == int(logits[1].argmax()) and batched[1].logprob is None


@torch.inference_mode()
def test_same_seed_same_text(tiny_llama_dir):
    # A fresh session per run: reusing the cached prompt prefills only its last token, whose bf16 logits may differ in
    # the last bits from a whole-prompt prefill (another GEMM shape), which can move a draw of this random model.
    def run(seed):
        session = session_for(tiny_llama_dir, dtype="bfloat16")
        prompt = session.tok.encode("Hello there")
        return session.generate(prompt, GenerationParams(max_tokens=16, ignore_eos=True, sampling=SamplingParams(temperature=1.0, seed=seed)))

    assert run(123) == run(123)
    assert run(123)[1] != run(124)[1]


# ---- stopping, context, prefix reuse --------------------------------------------------------------------------------


@torch.inference_mode()
def test_eos_from_generation_config(tiny_llama_dir, tmp_path):
    folder = tmp_path / "eos"
    shutil.copytree(tiny_llama_dir, folder)
    session = session_for(folder)
    prompt = session.tok.encode("Hello")
    _, ids = session.generate(prompt, GenerationParams(max_tokens=12, ignore_eos=True, sampling=GREEDY))
    i = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, ids[i]]}))
    session = session_for(folder)
    chunks = list(session.stream(prompt, GenerationParams(max_tokens=12, sampling=GREEDY)))
    assert [c.token.token for c in chunks if c.token] == ids[:i]
    assert chunks[-1].finish_reason == "stop" and session.stats.completion_tokens == i
    assert session.generate(prompt, GenerationParams(max_tokens=12, ignore_eos=True, sampling=GREEDY))[1] == ids


@torch.inference_mode()
def test_context_overflow(tiny_llama_dir):
    session = session_for(tiny_llama_dir, max_seq_len=32)
    with pytest.raises(ContextOverflow, match="context holds 32"):
        list(session.stream(list(range(100, 140)), GenerationParams(sampling=GREEDY)))
    chunks = list(session.stream(list(range(100, 120)), GenerationParams(max_tokens=100, ignore_eos=True, sampling=GREEDY)))
    # 20 prompt tokens + 12 generated fill the 32 positions; a 13th token is sampled from the last position.
    assert session.stats.completion_tokens == 13 and chunks[-1].finish_reason == "length"
    chunks = list(session.stream(list(range(100, 120)), GenerationParams(max_tokens=5, ignore_eos=True, sampling=GREEDY)))
    assert session.stats.completion_tokens == 5 and chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("runner", ["eager", "position-invariant"])
@torch.inference_mode()
def test_second_turn_reuses_the_cached_prefix(runner, tiny_qwen2_dir, invariant_session):
    """A chat's second turn re-sends the first turn's prompt and reply: the scheduler's prefix cache serves whole
    prefill chunks of the first prompt (eager: a position's KV depends on its chunk), or on the position-invariant
    runner every position the first turn's slot holds, its reply included. Either way, the tokens of a fresh session."""
    if runner == "eager":
        session, fresh = (session_for(tiny_qwen2_dir, config=SchedulerConfig(prefill_chunk=4)) for _ in range(2))
    else:
        session, fresh = invariant_session(), invariant_session()
    params = GenerationParams(max_tokens=10, ignore_eos=True, sampling=GREEDY)
    first = session.tok.encode("A first message, long enough for a few chunks")
    _, reply = session.generate(first, params)
    assert session.stats.cached_tokens == 0
    follow_up = first + reply + session.tok.encode(" and a follow-up")
    text, ids = session.generate(follow_up, params)
    if runner == "eager":
        assert session.stats.cached_tokens == len(first) // 4 * 4 > 0
    else:
        assert session.stats.cached_tokens == len(first) + len(reply) - 1  # the last reply token was never fed back
    assert (text, ids) == fresh.generate(follow_up, params)
    assert session.stats.prefill_tok_s > 0 and not math.isnan(session.stats.decode_tok_s)


@torch.inference_mode()
def test_an_interrupted_stream_leaves_the_session_usable(invariant_session):
    """A stream closed mid-reply (the chat's Ctrl-C) or a KeyboardInterrupt inside a decode step ends its sequence at
    once: nothing stays in the session's scheduler, the slot is free again and the prefix cache knows what it holds,
    and the next call reuses it and gives what an uninterrupted session gives."""
    session, fresh = invariant_session(), invariant_session()
    params = GenerationParams(max_tokens=12, ignore_eos=True, sampling=GREEDY)
    prompt = session.tok.encode("Once upon a time")
    expected = fresh.generate(prompt, params)
    runner = session.runner

    stream = session.stream(prompt, params)
    for _ in range(4):
        next(stream)
    with pytest.raises(RuntimeError, match="still open"):
        next(session.stream(prompt, params))
    stream.close()
    assert not session.scheduler.has_work() and runner.pool.num_free == 1
    longer = prompt + expected[1][:3] + expected[1][:2]  # 4 tokens shown, the first 3 fed back
    session.generate(longer, GenerationParams(max_tokens=1, sampling=GREEDY))
    assert session.stats.cached_tokens == len(prompt) + 3
    assert session.generate(prompt, params) == expected
    assert session.stats.cached_tokens == len(prompt) - 1

    calls = []

    def decode(*args):  # Ctrl-C landing inside the third decode step
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return type(runner).decode(runner, *args)

    runner.decode = decode
    with pytest.raises(KeyboardInterrupt):
        list(session.stream(prompt, params))
    del runner.decode
    assert not session.scheduler.has_work() and runner.pool.num_free == 1
    assert session.generate(prompt, params) == expected


@torch.inference_mode()
def test_a_chat_reply_stopped_mid_way_keeps_the_chat_going(invariant_session):
    session = invariant_session()
    stops = []

    class Screen(io.StringIO):
        def write(self, text):  # Ctrl-C as the first text of the first reply appears
            if text.strip() and not stops:
                stops.append(1)
                chat.stop_requested = True
            return super().write(text)

    chat = Chat(session, ChatConfig(max_tokens=8, sampling=GREEDY), out=Screen())
    chat.reply("Hello there")
    assert "(stopped)" in chat.out.getvalue() and not session.scheduler.has_work()
    chat.stop_requested = False  # what reading the next line does
    chat.reply("And again")
    assert chat.out.getvalue().count("(stopped)") == 1 and len(chat.history) == 4
    assert session.stats.completion_tokens >= 1 and session.stats.cached_tokens > 0  # the first turn was reused
