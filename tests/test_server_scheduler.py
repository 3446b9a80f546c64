"""Continuous batching in-process (no HTTP): batch-independent greedy and seeded output, chunked prefill, slots freed
on abort, the bounded waiting queue, and the Session (generate / chat) running the same loop. Runs on a tiny
random-weight Llama packed as INT4, so the CPU kernel that the dispatcher picks by M is exercised with more than
CPU_INT4PACK_MAX_M rows."""

import json
from dataclasses import replace

import pytest
import torch

from tinyserve_kernels.dispatch import CPU_INT4PACK_MAX_M
from native_variants import need
from runtime_helpers import write_rtn_folder
from tinyserve.server import protocol as P
from tinyserve.generation.session import GenerationParams, Session
from tinyserve.runtime.runner import ModelRunner, RunnerConfig
from tinyserve.generation.sampling import SamplingParams
from tinyserve.generation.scheduler import FinishReason, QueueFull, Scheduler, SchedulerConfig, SeqSpec
from tinyserve.generation.tokenizer import Tokenizer

NUM_SLOTS = CPU_INT4PACK_MAX_M + 4  # a full batch takes the grouped path of the batch-invariant decode
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory, tiny_llama_dir):
    return write_rtn_folder(tiny_llama_dir, tmp_path_factory.mktemp("tiny-int4"), group_size=64)


@pytest.fixture(scope="module")
def runner_tok(tiny_int4):
    # One thread: a tiny model gains nothing from two, and on a busy 2-core machine two OpenMP threads that wait for
    # each other make each step tens of times slower. The setting is process-wide, so it is restored afterwards.
    threads = torch.get_num_threads()
    runner = ModelRunner(tiny_int4, RunnerConfig(device="cpu", num_slots=NUM_SLOTS, max_seq_len=256, batch_invariant=True, threads=1))
    yield runner, Tokenizer(tiny_int4, runner.cfg.eos_token_ids)
    torch.set_num_threads(threads)


def make_specs(tok: Tokenizer, count: int, max_tokens: int = 24, sampling: SamplingParams = GREEDY) -> list[SeqSpec]:
    # Prompt lengths from ~5 to ~70 tokens: several prefill chunks of 16, and different positions in one batch.
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    specs = []
    for i in range(count):
        text = " ".join(words[(i + j) % len(words)] for j in range(3 + 5 * i))
        specs.append(SeqSpec(tuple(tok.encode(text)), max_tokens, sampling))
    return specs


def run(sched: Scheduler, specs: list[SeqSpec], late: list[SeqSpec] = (), late_after: int = 3) -> dict[int, tuple[list[int], str, str]]:
    """Step until every sequence finishes; `late` ones are added after `late_after` steps. -> id: (tokens, text, reason)."""
    ids = sched.add(specs)
    tokens, text, reason = {}, {}, {}
    steps = 0
    while sched.has_work() or (late and steps <= late_after):
        if late and steps == late_after:
            ids += sched.add(late)
        for out in sched.step():
            tokens.setdefault(out.seq_id, [])
            text[out.seq_id] = text.get(out.seq_id, "") + out.text
            if out.token is not None:
                tokens[out.seq_id].append(out.token.token)
            if out.finish_reason is not None:
                reason[out.seq_id] = out.finish_reason
        steps += 1
        assert steps < 10_000
    return {i: (tokens.get(i, []), text.get(i, ""), reason[i]) for i in ids}


def test_greedy_and_seeded_output_do_not_depend_on_the_batch(runner_tok):
    runner, tok = runner_tok
    sched = Scheduler(runner, tok, SchedulerConfig(max_waiting=64, prefill_chunk=16))
    greedy = make_specs(tok, NUM_SLOTS)
    seeded = [SeqSpec(s.prompt_ids, s.max_tokens, SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i)) for i, s in enumerate(make_specs(tok, 4))]
    everything = greedy + seeded
    alone = [next(iter(run(sched, [s]).values())) for s in everything]
    assert all(reason == "length" for _, _, reason in alone)
    assert len({tuple(t) for t, _, _ in alone}) == len(everything), "prompts should give distinct continuations"
    assert runner.pool.num_free == NUM_SLOTS

    # All at once: more sequences than slots, so some wait, and the batch size changes as they come and go.
    together = list(run(sched, everything).values())
    assert together == alone
    # Staggered: half arrive while the others are mid-decode (prefill chunks interleave with decode steps).
    half = len(everything) // 2
    staggered = list(run(sched, everything[:half], late=everything[half:]).values())
    assert staggered == alone
    assert runner.pool.num_free == NUM_SLOTS


def test_abort_frees_the_slot_at_the_next_step(runner_tok):
    runner, tok = runner_tok
    sched = Scheduler(runner, tok, SchedulerConfig(prefill_chunk=16))
    waiting_too = make_specs(tok, NUM_SLOTS + 2, max_tokens=150)  # two of them cannot get a slot yet
    ids = sched.add(waiting_too)
    for _ in range(8):
        sched.step()
    assert runner.pool.num_free == 0 and sched.num_waiting == 2
    sched.abort(ids)
    outs = sched.step()
    assert runner.pool.num_free == NUM_SLOTS
    assert sorted(o.seq_id for o in outs if o.finish_reason == "cancelled") == sorted(ids)
    assert not sched.has_work()


def test_waiting_queue_is_bounded_and_all_or_nothing(runner_tok):
    runner, tok = runner_tok
    sched = Scheduler(runner, tok, SchedulerConfig(max_waiting=3))
    specs = make_specs(tok, 4, max_tokens=2)
    with pytest.raises(QueueFull):
        sched.add(specs)
    assert sched.num_waiting == 0
    sched.add(specs[:3])
    with pytest.raises(QueueFull):
        sched.add(specs[3:])
    results = run(sched, [])
    assert results == {}
    assert runner.pool.num_free == NUM_SLOTS


def test_finish_reasons_eos_and_stop_string(runner_tok):
    runner, tok = runner_tok
    sched = Scheduler(runner, tok)
    spec = make_specs(tok, 1, max_tokens=30)[0]
    (tokens, text, reason), = run(sched, [spec]).values()
    assert reason == "length" and len(tokens) == 30 and text == tok.decode(tokens)
    # A stop string taken from the middle of the greedy text cuts it there and is never part of the output.
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    (tokens2, text2, reason2), = run(sched, [SeqSpec(spec.prompt_ids, 30, GREEDY, (stop,))]).values()
    assert reason2 == "stop" and text2 == cut and tokens2 == tokens[: len(tokens2)]
    # EOS: make the model's 5th greedy token an end-of-sequence id; it is not counted and not shown.
    eos_sched = Scheduler(runner, tok)
    eos_sched.eos = frozenset({tokens[4]})
    (tokens3, text3, reason3), = run(eos_sched, [spec]).values()
    first_eos = tokens.index(tokens[4])
    assert reason3 == "stop" and tokens3 == tokens[:first_eos] and text3 == tok.decode(tokens[:first_eos])


def test_a_session_runs_the_same_loop_as_the_server(runner_tok):
    """`generate` and `chat` (a Session, one sequence at a time) and the server (the Scheduler) are one loop:
    the same tokens, text and finish reason for max_tokens, a stop string, EOS, and EOS with ignore_eos."""
    runner, tok = runner_tok
    spec = make_specs(tok, 1, max_tokens=20)[0]
    (tokens, text, _), = run(Scheduler(runner, tok), [spec]).values()
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    eos = frozenset({tokens[4]})  # an id the greedy reply contains, made an end-of-sequence token
    cases = [(spec, None), (SeqSpec(spec.prompt_ids, 20, GREEDY, (stop,)), None), (spec, eos),
             (SeqSpec(spec.prompt_ids, 20, GREEDY, ignore_eos=True), eos)]
    results = []
    for case, eos_ids in cases:
        sched, session = Scheduler(runner, tok), Session(runner, tok)
        if eos_ids:
            sched.eos = session.scheduler.eos = eos_ids
        (server,) = run(sched, [case]).values()
        chunks = list(session.stream(case.prompt_ids, GenerationParams(case.max_tokens, case.stop, case.ignore_eos, case.sampling)))
        alone = ([c.token.token for c in chunks if c.token], "".join(c.text for c in chunks), chunks[-1].finish_reason)
        assert alone == server and session.stats.finish_reason is server[2]
        assert session.stats.completion_tokens == len(server[0])
        results.append(server)
    assert [r for _, _, r in results] == [FinishReason.LENGTH, FinishReason.STOP, FinishReason.STOP, FinishReason.LENGTH]
    assert len(results[2][0]) < 20 and results[3][0] == tokens  # EOS stopped it; ignore_eos went through it
    assert runner.pool.num_free == NUM_SLOTS


def test_finish_reasons_are_plain_strings_on_the_wire():
    reason = P.chat_choice(0, "", FinishReason.STOP, None)["finish_reason"]
    assert type(reason) is str and reason == "stop" and P.text_choice(0, "", None, None)["finish_reason"] is None
    assert json.dumps(P.chat_delta(0, {}, FinishReason.LENGTH)).endswith('"finish_reason": "length"}')
    assert f"{FinishReason.SHUTDOWN}" == str(FinishReason.SHUTDOWN) == "shutdown" == FinishReason("shutdown")


def test_constrained_and_free_sequences_share_a_batch(runner_tok):
    """A grammar-constrained sequence decodes in the same batch as free ones: the free ones' tokens are those they
    get alone, and the constrained one (random weights: only the grammar keeps it valid) writes JSON of the schema."""
    runner, tok = runner_tok
    sched = Scheduler(runner, tok)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    grammar = sched.grammars.structured(schema, True, [], False, "<tool_call>", "</tool_call>")
    free = make_specs(tok, 5)
    alone = run(Scheduler(runner, tok), free)
    constrained = SeqSpec(free[0].prompt_ids, 40, GREEDY, grammar=grammar)
    together = run(sched, free[:2] + [constrained] + free[2:])
    outs = list(together.values())
    assert [o[0] for o in outs[:2] + outs[3:]] == [o[0] for o in alone.values()]
    tokens, text, reason = outs[2]
    assert reason is FinishReason.STOP and set(json.loads(text)) == {"ok", "n"}


def shared_prefix_specs(tok: Tokenizer, n: int, prefix_tokens: int, max_tokens: int = 12) -> list[SeqSpec]:
    """n prompts that share their first `prefix_tokens` tokens and then differ."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    shared = list(tok.encode(" ".join(words[i % len(words)] for i in range(prefix_tokens))))[:prefix_tokens]
    return [SeqSpec(tuple(shared + tok.encode(f" question {i}: " + " ".join(words[: 3 + i]), add_special_tokens=False)),
                    max_tokens, GREEDY) for i in range(n)]


def first_outputs(sched: Scheduler, specs: list[SeqSpec]) -> dict[int, int]:
    """Run specs one after the other; -> id: cached_tokens of its first output."""
    got = {}
    for spec in specs:
        ids = sched.add([spec])
        while sched.has_work():
            for o in sched.step():
                if o.seq_id in ids and o.token is not None and o.seq_id not in got:
                    got[o.seq_id] = o.cached_tokens
    return got


@pytest.mark.parametrize("arrival", ["one by one", "while the first decodes", "all at once"])
def test_prefix_cache_serves_whole_chunks_and_changes_no_token(runner_tok, arrival):
    """Prompts sharing 40 tokens, chunks of 16: each later prompt reuses 32 positions (two whole chunks), from a
    finished sequence's slot (taken over) or a running one's (copied; all at once: the others wait for the first's
    prefill); tokens equal the uncached run's."""
    runner, tok = runner_tok
    specs = shared_prefix_specs(tok, 5, 40)
    cfg = SchedulerConfig(prefill_chunk=16)
    plain = run(Scheduler(runner, tok, replace(cfg, prefix_cache=False)), specs)
    sched = Scheduler(runner, tok, cfg)
    if arrival == "while the first decodes":
        cached = run(sched, specs[:1], late=specs[1:], late_after=4)
        assert sched.stats.cached_tokens == 4 * 32
    elif arrival == "all at once":
        cached = run(sched, specs)
        assert sched.stats.cached_tokens == 4 * 32
    else:
        cached = {}
        for spec in specs:
            cached.update(run(sched, [spec]))
    assert [v[0] for v in cached.values()] == [v[0] for v in plain.values()]
    assert [v[2] for v in cached.values()] == [v[2] for v in plain.values()]
    assert list(first_outputs(Scheduler(runner, tok, cfg), specs).values()) == [0] + [32] * 4  # the first computes everything


def test_prefix_cache_ignores_a_slot_given_out_elsewhere(runner_tok):
    """Another scheduler on the runner takes the slot a finished sequence left its prefix in: the entry is dropped,
    not reused."""
    runner, tok = runner_tok
    specs = shared_prefix_specs(tok, 2, 40)
    sched = Scheduler(runner, tok, SchedulerConfig(prefill_chunk=16))
    run(sched, specs[:1])
    (slot,) = [s for s, e in sched.prefix.entries.items() if len(e[1]) == 32]
    taken = [runner.alloc_slot() for _ in range(runner.pool.num_free)]  # every free slot, that one included
    assert slot in taken
    for s in taken:
        runner.free_slot(s)
    slot, reused = sched.prefix.take(specs[1].prompt_ids)
    runner.free_slot(slot)
    assert reused == 0


@pytest.fixture(scope="module")
def invariant_runner_tok(tiny_int4):
    """The runner `serve` builds on CPU: position-invariant on the cpu-native backend (forced on, as on any CPU it
    builds on), one thread as above."""
    need("native")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYSERVE_CPU_KERNEL", "1")
        runner = ModelRunner(tiny_int4, RunnerConfig(device="cpu", num_slots=NUM_SLOTS, max_seq_len=256, batch_invariant=True,
                                                     position_invariant=True, threads=1))
    assert runner.position_invariant
    yield runner, Tokenizer(tiny_int4, runner.cfg.eos_token_ids)
    torch.set_num_threads(threads)


def test_position_invariant_prefix_cache_reuses_a_chat_turns_reply(invariant_runner_tok):
    """Turn 2 of a chat re-sends turn 1's prompt and reply and adds a message: it reuses every position turn 1's slot
    holds (the prompt and each reply token fed back, decoded ones included), and its tokens equal the uncached run's."""
    runner, tok = invariant_runner_tok
    cfg = SchedulerConfig(prefill_chunk=16)
    turn1 = make_specs(tok, 4, max_tokens=10)[3]
    sched = Scheduler(runner, tok, cfg)
    ((reply, _, reason),) = run(sched, [turn1]).values()
    fed = len(reply) - (reason == FinishReason.LENGTH)  # a length finish never feeds its last token back
    turn2 = SeqSpec(turn1.prompt_ids + tuple(reply) + tuple(tok.encode(" and then what", add_special_tokens=False)), 12, GREEDY)
    sched.take_stats()
    ((after_turn1, _, _),) = run(sched, [turn2]).values()
    assert sched.take_stats().cached_tokens == len(turn1.prompt_ids) + fed
    ((again, _, _),) = run(sched, [turn2]).values()  # the whole of turn 2's prompt but its last token is cached now
    assert sched.take_stats().cached_tokens == len(turn2.prompt_ids) - 1
    ((plain, _, _),) = run(Scheduler(runner, tok, replace(cfg, prefix_cache=False)), [turn2]).values()
    assert after_turn1 == plain and again == plain


@pytest.mark.parametrize("arrival", ["one by one", "all at once"])
def test_position_invariant_prefix_cache_reuses_any_prefix_and_changes_no_token(invariant_runner_tok, arrival):
    """Prompts sharing 40 tokens: one by one, each later prompt reuses its whole common prefix with an earlier one
    (not just whole chunks of 16); all at once, the others wait while the first's next chunk would give them at least
    16 more tokens (min(prefill_chunk, MIN_PREFIX_WAIT)) and then copy what it holds. Tokens equal the uncached run's."""
    runner, tok = invariant_runner_tok
    specs = shared_prefix_specs(tok, 5, 40)
    cfg = SchedulerConfig(prefill_chunk=16)
    plain = run(Scheduler(runner, tok, replace(cfg, prefix_cache=False)), specs)
    sched = Scheduler(runner, tok, cfg)
    if arrival == "all at once":
        cached = run(sched, specs)
        assert sched.stats.cached_tokens >= 4 * 32
    else:
        reused = first_outputs(sched, specs)
        assert list(reused.values())[0] == 0 and all(n >= 40 for n in list(reused.values())[1:])
        cached = run(Scheduler(runner, tok, cfg), specs)
    assert [v[0] for v in cached.values()] == [v[0] for v in plain.values()]


class OracleDrafter:
    """A drafter that knows each prompt's plain greedy continuation and proposes it, every other step with its last
    proposal wrong: the verify step then keeps some proposals and rejects others."""

    expected: dict[tuple[int, ...], list[int]] = {}

    def __init__(self, prompt):
        self.prompt, self.tokens, self.steps = tuple(prompt), list(prompt), 0

    def append(self, token):
        self.tokens.append(token)

    def propose(self, k):
        self.steps += 1
        n = len(self.tokens) - len(self.prompt)
        d = list(self.expected[self.prompt][n : n + k])
        if d and self.steps % 2 == 0:
            d[-1] = (d[-1] + 1) % 50  # a wrong token
        return d


@pytest.mark.parametrize("drafter", ["prompt lookup", "oracle"])
@pytest.mark.parametrize("k", [1, 4])
def test_speculation_gives_the_tokens_of_plain_decoding(invariant_runner_tok, monkeypatch, drafter, k):
    """Greedy sequences (one with a repetition penalty), one at a time and three at once: the same tokens and
    finishes with speculation as without. The oracle drafter's proposals are partly right and partly wrong, so
    verification keeps some and rolls the slot back past others; prompt lookup proposes what it finds."""
    runner, tok = invariant_runner_tok
    words = "one two three four five six seven eight nine ten".split()
    specs = [SeqSpec(tuple(tok.encode(" ".join(words[: 4 + 2 * i] * 3))), 30, GREEDY) for i in range(3)]
    specs.append(SeqSpec(specs[0].prompt_ids + (7,), 30, SamplingParams(temperature=0.0, repetition_penalty=1.3)))
    plain = run(Scheduler(runner, tok, SchedulerConfig(prefill_chunk=16)), specs)
    if drafter == "oracle":
        OracleDrafter.expected = {spec.prompt_ids: v[0] for spec, v in zip(specs, plain.values())}
        monkeypatch.setattr("tinyserve.generation.scheduler.PromptLookup", OracleDrafter)
    for batch in (1, 3):
        sched = Scheduler(runner, tok, SchedulerConfig(prefill_chunk=16, speculate=k, speculate_max_batch=batch))
        got = run(sched, specs) if batch > 1 else {i: v for spec in specs for i, v in run(sched, [spec]).items()}
        assert [v[0] for v in got.values()] == [v[0] for v in plain.values()]
        assert [v[2] for v in got.values()] == [v[2] for v in plain.values()]
        assert sched.stats.accepted_tokens <= sched.stats.draft_tokens
        if drafter == "oracle":
            assert 0 < sched.stats.accepted_tokens < sched.stats.draft_tokens
            assert sched.stats.verify_steps < sum(len(v[0]) for v in plain.values())  # fewer steps than tokens
    assert runner.pool.num_free == NUM_SLOTS


def distinct_specs(tok: Tokenizer, n: int, tokens: int = 40, max_tokens: int = 6) -> list[SeqSpec]:
    """n prompts of `tokens` tokens that differ from their first token on."""
    words = "amber birch cobalt dune ember fjord granite harbor iris juniper kelp lagoon meadow nectar orchid pebble".split()
    return [SeqSpec(tuple(tok.encode(" ".join(words[(i + j * (i + 1)) % len(words)] for j in range(tokens)))[:tokens]),
                    max_tokens, GREEDY) for i in range(n)]


def test_prefix_cache_keeps_prefixes_in_host_memory_after_their_slot_is_reused(invariant_runner_tok):
    """A conversation whose slot went to NUM_SLOTS other prompts comes back: its prompt and reply are copied back from
    host memory (prefix_cache_bytes), not prefilled, and the tokens equal the uncached run's. Without the host tier
    nothing is reused. Under a budget of one entry, only the most recently saved one stays, within the budget."""
    runner, tok = invariant_runner_tok
    cfg = SchedulerConfig(prefill_chunk=16)
    convo, *others = distinct_specs(tok, NUM_SLOTS + 4, tokens=50)
    others, extra = others[:NUM_SLOTS], others[NUM_SLOTS:]
    assert len(set(s.prompt_ids[0] for s in [convo, *others, *extra])) == NUM_SLOTS + 4
    ((reply, _, reason),) = run(Scheduler(runner, tok, replace(cfg, prefix_cache=False)), [convo]).values()
    fed = len(reply) - (reason == FinishReason.LENGTH)
    turn2 = SeqSpec(convo.prompt_ids + tuple(reply) + tuple(tok.encode(" and then", add_special_tokens=False)), 8, GREEDY)
    ((plain, _, _),) = run(Scheduler(runner, tok, replace(cfg, prefix_cache=False)), [turn2]).values()
    per_token = runner.cache.bytes_per_token()
    for budget, want in [(cfg.prefix_cache_bytes, len(convo.prompt_ids) + fed), (0, 0)]:
        sched = Scheduler(runner, tok, replace(cfg, prefix_cache_bytes=budget))
        run(sched, [convo])
        for spec in others:  # one after the other: each takes the least recently used slot, convo's among them
            run(sched, [spec])
        assert all(sched.prefix._valid(s)[:1] != convo.prompt_ids[:1] for s in sched.prefix.entries)  # no slot holds it
        sched.take_stats()
        ((got, _, _),) = run(sched, [turn2]).values()
        assert sched.take_stats().cached_tokens == want and got == plain
        # the empty slots went first: convo's slot was the first reused (by the last of the others), then others[0]'s
        assert [e.tokens[0] for e in sched.prefix.saved] == ([convo.prompt_ids[0], others[0].prompt_ids[0]] if budget else [])
    sched = Scheduler(runner, tok, replace(cfg, prefix_cache_bytes=60 * per_token))  # one 50-56 token entry fits
    for spec in [convo, *others, *extra]:  # the extras reuse others[0..2]'s slots, each saved in turn
        run(sched, [spec])
    assert [e.tokens[0] for e in sched.prefix.saved] == [others[2].prompt_ids[0]]
    assert sched.prefix.saved_bytes <= 60 * per_token


def test_speculation_needs_a_position_invariant_runner(runner_tok):
    runner, tok = runner_tok
    with pytest.raises(ValueError, match="position-invariant"):
        Scheduler(runner, tok, SchedulerConfig(speculate=4))


def test_a_draft_model_gives_the_tokens_of_plain_decoding_and_its_slots_back(invariant_runner_tok, tiny_int4):
    """The same tiny model as its own draft (a runner of its own, with fewer slots than sequences, so the last one
    falls back to prompt lookup): greedy tokens equal plain decoding, most proposals are kept, every draft slot is
    free at the end."""
    runner, tok = invariant_runner_tok
    draft = ModelRunner(tiny_int4, RunnerConfig(device="cpu", num_slots=2, max_seq_len=256, threads=1))
    words = "one two three four five six seven eight nine ten".split()
    specs = [SeqSpec(tuple(tok.encode(" ".join(words[i : i + 5]))), 20, GREEDY) for i in range(3)]
    plain = run(Scheduler(runner, tok, SchedulerConfig(prefill_chunk=16)), specs)
    sched = Scheduler(runner, tok, SchedulerConfig(prefill_chunk=16, speculate=3, speculate_max_batch=3), draft=draft)
    got = run(sched, specs)
    assert [v[0] for v in got.values()] == [v[0] for v in plain.values()]
    st = sched.stats
    assert st.draft_tokens > 0 and st.accepted_tokens > st.draft_tokens // 2
    assert draft.pool.num_free == 2 and runner.pool.num_free == NUM_SLOTS
