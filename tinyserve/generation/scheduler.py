"""Continuous batching: which sequences run in the next step, and what each step produced.

One `step()`:
  1. sequences cancelled since the last step give their KV slot back (the slot is free before anything else runs);
  2. every running sequence decodes one token, all in one batched `runner.decode` call (M = running sequences), or,
     speculating (at most speculate_max_batch of them), feeds its last token and its drafter's proposals and keeps
     the ones that verify;
  3. waiting sequences take free slots (FIFO; with the prefix cache, a slot that holds part of the prompt already,
     prefix_cache.py) and their prompts are prefilled, at most `prefill_chunk` prompt
     tokens per step, so a long prompt delays the running sequences by one chunk per step, not by the whole prompt.
     A sequence whose prompt is complete samples its first token and decodes with the others from the next step on.
  4. sequences that hit EOS, a stop string, max_tokens or the end of the context finish and free their slot at once.

Every sequence ends with exactly one output whose `finish_reason` is set, a `FinishReason`:
  STOP       an EOS token (not shown, not counted) or a stop string (cut from the text);
  LENGTH     max_tokens generated, or the context is full;
  CANCELLED  `abort` / `abort_all`: the client went away, or a Session's stream was closed early;
  ERROR      the runner raised while prefilling or decoding it (`Output.error` says what);
  SHUTDOWN   `abort_all(FinishReason.SHUTDOWN)`: the server stopped before it finished.

This is the one generation loop: the server runs it for many sequences through the engine, and `generate.Session`
(the `generate` and `chat` commands) runs it for one; a chat's turns find each other through the prefix cache as the
server's clients do.

Greedy output must not depend on the batch: a prompt is always cut into the same chunks (boundaries at multiples of
`prefill_chunk`, whatever else is waiting), sampling is per row (tinyserve.generation.sampling) and the runner's decode is
built so a row's logits do not depend on the other rows.

The scheduler is synchronous and owns the runner; `add` and `abort` may be called from any thread (the engine calls
them from the event loop while its worker thread runs `step`).
"""

import itertools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import Enum

from tinyserve.model import SeqChunk
from tinyserve.runtime.kv_cache import NoFreeSlot
from tinyserve.runtime.runner import ContextOverflow, ModelRunner
from tinyserve.generation.grammar import Grammars
from tinyserve.generation.prefix_cache import PrefixCache
from tinyserve.generation.sampling import SampleResult, SamplingParams, SequenceSampler, sample
from tinyserve.generation.speculative import DraftModel, PromptLookup
from tinyserve.generation.tokenizer import IncrementalDetokenizer, StopStrings, Tokenizer


# A waiting sequence waits for one now prefilling only when that one is about to write at least this many of its
# prompt tokens that no slot holds yet, or a whole prefill chunk (a short shared header is not worth a step's delay).
MIN_PREFIX_WAIT = 64


class FinishReason(str, Enum):
    """Why a sequence ended. A str, so JSON writes the plain value ("stop"); str() and f-strings give it too."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"
    SHUTDOWN = "shutdown"

    def __str__(self) -> str:
        return self.value


class QueueFull(RuntimeError):
    """The waiting queue holds max_waiting sequences; the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_waiting: int = 64  # sequences waiting for a slot; beyond this `add` raises QueueFull
    prefill_chunk: int = 512  # most prompt tokens prefilled per step (and the fixed chunk size of every prompt)
    prefix_cache: bool = True  # start from a prompt prefix a slot already holds (prefix_cache.py; output unchanged)
    prefix_cache_bytes: int = 1 << 30  # host memory for prefixes whose slots went to other prompts (0: slots only)
    # Speculative decoding (speculative.py: prompt lookup, or the Scheduler's draft model): up to this many proposed
    # tokens verified per sequence and step (0: off), while at most speculate_max_batch sequences decode; needs a
    # position-invariant runner.
    speculate: int = 0
    speculate_max_batch: int = 1

    def __post_init__(self):
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1, got {self.max_waiting}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.speculate < 0 or self.speculate_max_batch < 1:
            raise ValueError("speculate must be >= 0 and speculate_max_batch >= 1")


@dataclass(frozen=True)
class SeqSpec:
    """What to generate for one sequence (one choice of one request, or one call of a Session)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # EOS ids are sampled, shown and counted like any other token
    # False (the server): `add` refuses prompt + max_tokens > the context. True (a Session): any prompt shorter than
    # the context is accepted, and generation stops with LENGTH when the context is full.
    clamp_to_context: bool = False
    grammar: str | None = None  # a grammar the output must follow (Scheduler.grammars compiled it); None: free


@dataclass
class Output:
    """What one step produced for one sequence. `token` is None on the output that only finishes a sequence."""

    seq_id: int
    text: str
    token: SampleResult | None
    finish_reason: FinishReason | None = None  # set on the sequence's last output only
    error: str | None = None  # finish_reason ERROR: why
    cached_tokens: int = 0  # on a sequence's first output: prompt tokens the prefix cache served


@dataclass
class Sequence:
    id: int
    spec: SeqSpec
    arrival: float  # time.perf_counter() at add
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the slot
    reused: int = 0  # prompt tokens the prefix cache served
    completion_tokens: int = 0
    last_token: int | None = None  # sampled, not yet fed to the model
    fed: list[int] = field(default_factory=list)  # sampled tokens fed to the model so far (their KV is in the slot)
    drafter: PromptLookup | DraftModel | None = None  # speculation's proposals (None: one token a step)
    first_token_at: float | None = None
    last_token_at: float | None = None
    sampler: SequenceSampler | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopStrings | None = None


@dataclass
class StepStats:
    """Timings of finished work, for metrics: seconds from arrival to first token, and between tokens."""

    ttft: list[float] = field(default_factory=list)
    inter_token: list[float] = field(default_factory=list)
    prompt_tokens: int = 0  # prompt tokens prefilled this step
    cached_tokens: int = 0  # prompt tokens the prefix cache served to sequences admitted this step
    draft_tokens: int = 0  # tokens proposed for verification (speculative decoding)
    accepted_tokens: int = 0  # of those, kept
    verify_steps: int = 0  # sequence-steps that verified proposed tokens
    finished: dict[FinishReason, int] = field(default_factory=dict)


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: SchedulerConfig = SchedulerConfig(),
                 draft: ModelRunner | None = None):
        """draft: a smaller model with the same tokenizer whose greedy continuations speculation verifies (one slot
        of it per speculating sequence; prompt lookup where none is free). Without it, prompt lookup."""
        self.runner, self.tok, self.config, self.draft = runner, tokenizer, config, draft
        self.eos = tokenizer.eos_token_ids | frozenset(runner.cfg.eos_token_ids)
        self._lock = threading.Lock()  # guards _waiting, _aborted and _ids (touched by other threads)
        self._waiting: deque[Sequence] = deque()
        self._aborted: dict[int, FinishReason] = {}  # seq id -> the finish reason to report
        self._abort_all: FinishReason | None = None  # set by abort_all: the reason every sequence is stopped with
        self._ids = itertools.count()
        self.prefilling: list[Sequence] = []  # hold a slot, prompt not complete (worker thread only)
        self.running: list[Sequence] = []  # hold a slot, decoding (worker thread only)
        self.stats = StepStats()
        self.grammars = Grammars(tokenizer.hf, runner.cfg.vocab_size, self.eos)
        self.prefix = PrefixCache(runner, config.prefill_chunk, config.prefix_cache_bytes) if config.prefix_cache else None
        if config.speculate and not runner.position_invariant:
            raise ValueError("speculative decoding needs a position-invariant runner (the cpu-native backend with "
                             "RunnerConfig.position_invariant): elsewhere verified tokens could differ from decoded ones")
        self._masks: ThreadPoolExecutor | None = None  # computes grammar masks while the forward runs

    # ---- any thread -------------------------------------------------------------------------------------------

    def add(self, specs: Seq[SeqSpec]) -> list[int]:
        """Queue sequences (all or none); returns their ids. QueueFull when they do not fit in the waiting queue."""
        max_len = self.runner.max_seq_len
        for spec in specs:
            n = len(spec.prompt_ids)
            if not n or spec.max_tokens < 1:
                raise ValueError("a sequence needs a prompt and max_tokens >= 1")
            if spec.clamp_to_context:
                if n >= max_len:
                    raise ContextOverflow(f"the prompt has {n} tokens; the context holds {max_len} (prompt and reply together)")
            elif n + spec.max_tokens > max_len:
                raise ContextOverflow(f"{n} prompt tokens + {spec.max_tokens} new tokens exceed the context of {max_len}")
        now = time.perf_counter()
        with self._lock:
            if len(self._waiting) + len(specs) > self.config.max_waiting:
                raise QueueFull(f"{len(self._waiting)} sequences are already waiting (limit {self.config.max_waiting})")
            seqs = [Sequence(next(self._ids), spec, now) for spec in specs]
            self._waiting.extend(seqs)
        return [s.id for s in seqs]

    def abort(self, seq_ids: Seq[int], reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Stop these sequences at the start of the next step (their slots are freed then). Unknown ids are ignored."""
        reason = FinishReason(reason)
        with self._lock:
            for i in seq_ids:
                self._aborted.setdefault(i, reason)

    def abort_all(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Stop every sequence, queued or running, at the start of the next step."""
        reason = FinishReason(reason)
        with self._lock:
            self._abort_all = self._abort_all or reason

    @property
    def num_waiting(self) -> int:
        """Sequences queued for a slot."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding a KV slot."""
        return len(self.prefilling) + len(self.running)

    def has_work(self) -> bool:
        return bool(self._waiting or self.prefilling or self.running or self._aborted or self._abort_all)

    # ---- the worker thread ------------------------------------------------------------------------------------

    def step(self) -> list[Output]:
        out = self.reap_aborted()
        if self.running:
            self._decode(out)
        self._admit()
        self._prefill(out)
        return out

    def reap_aborted(self) -> list[Output]:
        """End the sequences aborted so far, now (the first thing `step` does); returns their final outputs.

        A Session calls it to leave nothing half-finished behind when its stream is closed or interrupted."""
        out: list[Output] = []
        with self._lock:
            if not self._aborted and not self._abort_all:
                return out
            aborted, self._aborted = self._aborted, {}
            if self._abort_all:
                for seq in itertools.chain(self._waiting, self.prefilling, self.running):
                    aborted.setdefault(seq.id, self._abort_all)
                self._abort_all = None
            kept = deque()
            for s in self._waiting:
                if s.id in aborted:
                    out.append(Output(s.id, "", None, aborted[s.id]))
                    self._count_finish(aborted[s.id])
                else:
                    kept.append(s)
            self._waiting = kept
        for group in (self.prefilling, self.running):
            for s in [s for s in group if s.id in aborted]:
                group.remove(s)
                self._release(s)
                out.append(Output(s.id, "", None, aborted[s.id]))
                self._count_finish(aborted[s.id])
        return out

    def _admit(self) -> None:
        """Waiting sequences take free slots, first come first served."""
        if not self._waiting:
            return
        with self._lock:
            while self._waiting:
                s = self._waiting[0]
                if not self.runner.pool.num_free:
                    break
                elif self.prefix is not None:
                    if self._prefix_pending(s):
                        break  # a sequence now prefilling will hold more of this prompt in a step or two
                    s.slot, s.reused = self.prefix.take(s.spec.prompt_ids)
                    s.prefilled = s.reused
                    self.stats.cached_tokens += s.reused
                else:
                    try:
                        s.slot = self.runner.alloc_slot()
                    except NoFreeSlot:
                        break
                self._waiting.popleft()
                self.prefilling.append(s)

    def _prefix_pending(self, s: Sequence) -> bool:
        """Is a sequence now prefilling about to write a reusable part of s's prompt (MIN_PREFIX_WAIT tokens or a
        whole chunk) that no slot holds yet? Then s waits for it: prefill runs one chunk budget per step anyway, so
        waiting costs s little and saves those tokens."""
        for p in self.prefilling:
            gain = self.prefix.reusable(p.spec.prompt_ids, s.spec.prompt_ids) - p.prefilled
            if gain > 0 and gain >= min(self.config.prefill_chunk, MIN_PREFIX_WAIT):
                return True
        return False

    def _prefill(self, out: list[Output]) -> None:
        budget = self.config.prefill_chunk
        C = self.config.prefill_chunk
        for s in list(self.prefilling):
            prompt = s.spec.prompt_ids
            # The chunk always ends at the next multiple of C (or the prompt's end): the same cuts whatever the load.
            end = min(len(prompt), (s.prefilled // C + 1) * C)
            if end - s.prefilled > budget and budget < C:
                break  # an earlier sequence used this step's budget; continue next step
            try:
                logits = self.runner.prefill(s.slot, prompt[s.prefilled : end], start=s.prefilled)
            except Exception as e:  # noqa: BLE001 - one bad sequence must not take the server down
                self.prefilling.remove(s)
                self._fail(s, e, out)
                continue
            self.stats.prompt_tokens += end - s.prefilled
            budget -= end - s.prefilled
            if self.prefix is not None:
                self.prefix.record(s.slot, prompt, s.prefilled, end)
            s.prefilled = end
            if end == len(prompt):
                self.prefilling.remove(s)
                try:
                    constraint = self.grammars.matcher(s.spec.grammar) if s.spec.grammar is not None else None
                except Exception as e:  # noqa: BLE001 - the grammar was checked when the request came in
                    self._fail(s, e, out)
                    continue
                s.sampler = SequenceSampler(s.spec.sampling, prompt, self.runner.cfg.vocab_size, self.runner.device, constraint)
                s.detok = IncrementalDetokenizer(self.tok, prompt)
                s.stops = StopStrings(s.spec.stop)
                if self.config.speculate and constraint is None and not (s.spec.sampling.logprobs or s.spec.sampling.top_logprobs):
                    s.drafter = DraftModel(self.draft, prompt) if self.draft is not None and self.draft.pool.num_free else PromptLookup(prompt)
                self._accept(s, sample(logits, [s.sampler])[0], out)
                out[-1].cached_tokens = s.reused  # _accept emits exactly one output, the sequence's first
            if budget <= 0:
                break

    def _decode(self, out: list[Output]) -> None:
        rows = self.running
        if self.config.speculate and len(rows) <= self.config.speculate_max_batch and any(s.drafter for s in rows):
            return self._decode_speculative(out)
        constrained = [s.sampler.constraint for s in rows if s.sampler.constraint is not None]
        masks = None
        if constrained:  # the grammar engine works (without the GIL) while the forward runs
            self._masks = self._masks or ThreadPoolExecutor(1, thread_name_prefix="tinyserve-grammar")
            masks = self._masks.submit(lambda: [c.fill() for c in constrained])
        try:
            logits = self.runner.decode([s.slot for s in rows], [s.last_token for s in rows])  # [M, V]
            for s in rows:
                s.fed.append(s.last_token)
            if masks is not None:
                masks.result()
        except Exception as e:  # noqa: BLE001 - fail these sequences, keep serving
            self.running = []
            for s in rows:
                self._fail(s, e, out)
            return
        results = sample(logits, [s.sampler for s in rows])
        self.running = []
        for s, res in zip(rows, results):
            self._accept(s, res, out)

    def _decode_speculative(self, out: list[Output]) -> None:
        """One step that feeds each sequence its last token and the tokens its drafter proposes, and keeps the
        proposals that verify (SequenceSampler.verify) plus one token more: a sequence's output is what decoding one
        token a step gives, since a verified position's logits are those of decoding it (position-invariant runner).
        Rejected positions are dropped from the slot (runner.truncate)."""
        rows, max_len = self.running, self.runner.max_seq_len
        drafts = []
        for s in rows:
            room = min(s.spec.max_tokens - s.completion_tokens - 1, max_len - self.runner.length(s.slot) - 1)
            drafts.append(s.drafter.propose(min(self.config.speculate, room)) if s.drafter is not None and room > 0 else [])
        chunks = [SeqChunk(s.slot, self.runner.length(s.slot), [s.last_token, *d]) for s, d in zip(rows, drafts)]
        try:
            logits = self.runner.step(chunks, all_logits=True)  # [sum of (1 + drafts), V]
        except Exception as e:  # noqa: BLE001 - fail these sequences, keep serving
            self.running = []
            for s in rows:
                self._fail(s, e, out)
            return
        self.running = []
        first = 0
        for s, d, chunk in zip(rows, drafts, chunks):
            s.fed.append(s.last_token)
            if s.drafter is None:  # (a constrained or logprobs sequence in the batch: sampled as usual)
                self._accept(s, sample(logits[first : first + 1], [s.sampler])[0], out)
                first += 1
                continue
            kept = 0
            for i in range(len(d) + 1):
                token = s.sampler.verify(logits[first + i], d[i] if i < len(d) else None)
                self._accept(s, SampleResult(token), out)
                if not (self.running and self.running[-1] is s) or i == len(d) or token != d[i]:
                    break  # finished, or this token is the step's last (a correction, or the one after every draft)
                self.running.pop()  # the draft was right: its position is valid, and the next one is checked
                s.fed.append(token)
                kept += 1
            first += len(chunk.tokens)
            self.stats.draft_tokens += len(d)
            self.stats.accepted_tokens += kept
            self.stats.verify_steps += bool(d)
            if s.slot is not None:  # (still running: a finished sequence's slot was freed)
                self.runner.truncate(chunk.slot, chunk.start + 1 + kept)

    def _accept(self, s: Sequence, res: SampleResult, out: list[Output]) -> None:
        """Handle one sampled token: emit text, decide whether the sequence goes on (then it joins `running`)."""
        now = time.perf_counter()
        if s.first_token_at is None:
            s.first_token_at = now
            self.stats.ttft.append(now - s.arrival)
        else:
            self.stats.inter_token.append(now - s.last_token_at)
        s.last_token_at = now
        if res.token in self.eos and not s.spec.ignore_eos:
            self._finish(s, FinishReason.STOP, out, "")
            return
        s.completion_tokens += 1
        if s.drafter is not None:
            s.drafter.append(res.token)
        text = s.stops.push(s.detok.push(res.token))
        if s.stops.stopped:
            out.append(Output(s.id, text, res, FinishReason.STOP))
            self._release(s)
            self._count_finish(FinishReason.STOP)
            return
        if s.completion_tokens >= s.spec.max_tokens or self.runner.length(s.slot) >= self.runner.max_seq_len:
            self._finish(s, FinishReason.LENGTH, out, text, res)
            return
        out.append(Output(s.id, text, res))
        s.last_token = res.token
        self.running.append(s)

    def _finish(self, s: Sequence, reason: FinishReason, out: list[Output], text: str, res: SampleResult | None = None) -> None:
        """End a sequence: release the text held back by the detokenizer and the stop-string matcher."""
        tail = s.stops.push(s.detok.flush())
        if s.stops.stopped:
            reason = FinishReason.STOP
        else:
            tail += s.stops.flush()
        out.append(Output(s.id, text + tail, res, reason))
        self._release(s)
        self._count_finish(reason)

    def _fail(self, s: Sequence, e: Exception, out: list[Output]) -> None:
        self._release(s)
        out.append(Output(s.id, "", None, FinishReason.ERROR, f"{type(e).__name__}: {e}"))
        self._count_finish(FinishReason.ERROR)

    def _release(self, s: Sequence) -> None:
        if isinstance(s.drafter, DraftModel):
            s.drafter.close()
        s.drafter = None
        if s.slot is not None:
            if self.prefix is not None:
                self.prefix.release(s.slot, list(s.spec.prompt_ids[: s.prefilled]) + s.fed)
            self.runner.free_slot(s.slot)
        s.slot = None

    def _count_finish(self, reason: FinishReason) -> None:
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def take_stats(self) -> StepStats:
        """The timings gathered since the last call (the engine feeds them to the metrics)."""
        stats, self.stats = self.stats, StepStats()
        return stats
