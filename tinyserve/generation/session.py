"""Single-session generation: what `generate` and `chat` (and the golden tests) run.

A `Session` has a `Scheduler` of its own and generates through it: the same loop as the server (sampling,
detokenizing, stop strings, EOS, max_tokens, a full context, the prefix cache), with one sequence. A chat turn
re-sends the whole history; the scheduler's prefix cache (prefix_cache.py) finds the previous turn's prompt and reply
in the slot that ran it, as it does for the server's clients. What is specific to a session lives here: the per-call
`Stats` (tokens, cached tokens, time to first token, tokens/s) that the CLI prints.
`stream` drives `scheduler.step()` synchronously and yields each step's output as a `Chunk`.
"""

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tinyserve.runtime.runner import ContextOverflow, ModelRunner
from tinyserve.generation.sampling import SampleResult, SamplingParams
from tinyserve.generation.scheduler import FinishReason, Scheduler, SchedulerConfig, SeqSpec
from tinyserve.generation.tokenizer import Tokenizer


class GenerationError(RuntimeError):
    """The runner failed while prefilling or decoding (the scheduler's FinishReason.ERROR, raised)."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self):
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")


@dataclass
class Chunk:
    """One streamed step: the text that became safe to show (may be empty) and, at the end, why it stopped."""

    text: str
    token: SampleResult | None = None  # None on a chunk that only finishes (EOS, or the text held back)
    finish_reason: FinishReason | None = None  # STOP (EOS or stop string) or LENGTH (max_tokens or context full)


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV the slot already held (not recomputed)
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first token sampled
    decode_s: float = 0.0  # first token -> last token
    finish_reason: FinishReason | None = None
    draft_tokens: int = 0  # speculative decoding: tokens proposed for verification
    accepted_tokens: int = 0  # ... and kept

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def speculation(self) -> str:
        """Speculative decoding's share of the work: proposals kept and tokens per decode step."""
        steps = self.completion_tokens - 1 - self.accepted_tokens
        per_step = (self.completion_tokens - 1) / steps if steps > 0 else 0.0
        return (f"kept {self.accepted_tokens} of {self.draft_tokens} proposed tokens "
                f"({self.accepted_tokens / max(self.draft_tokens, 1):.0%}), {per_step:.2f} tokens per step")

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (which the prefill produced)."""
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s > 0 else 0.0


class Session:
    """One sequence at a time on a runner, across calls (turns of a chat, or repeated generations)."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: SchedulerConfig = SchedulerConfig(),
                 draft: ModelRunner | None = None):
        """draft: speculative decoding's draft model (Scheduler), when config.speculate is on."""
        self.runner, self.tok = runner, tokenizer
        self.scheduler = Scheduler(runner, tokenizer, config, draft)
        self.stats = Stats()

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    @property
    def eos(self) -> frozenset[int]:
        """The token ids that end a reply (the tokenizer's and generation_config's)."""
        return self.scheduler.eos

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[Chunk]:
        """Generate from prompt_ids; yields Chunks, the last with finish_reason set. Updates self.stats as it goes.

        Raises ContextOverflow before doing any work when the prompt alone does not fit the context; a prompt that
        fits is generated from until max_tokens or the context is full (LENGTH). Closing the stream early (Ctrl-C in
        the chat) ends the sequence at once and leaves the session ready for the next call."""
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise ContextOverflow(f"the prompt has {len(prompt)} tokens; the context holds {self.max_seq_len} (prompt and reply together)")
        sched = self.scheduler
        if sched.has_work():
            raise RuntimeError("this session's previous stream is still open; close it before starting another")
        stats = self.stats = Stats(prompt_tokens=len(prompt))
        t0 = time.perf_counter()
        spec = SeqSpec(tuple(prompt), params.max_tokens, params.sampling, tuple(params.stop), params.ignore_eos,
                       clamp_to_context=True)
        (seq_id,) = sched.add([spec])
        t_first = None
        done = False
        try:
            while not done:
                for out in sched.step():  # this scheduler runs our sequence only
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                        stats.ttft_s = now - t0
                        stats.cached_tokens = out.cached_tokens
                    stats.decode_s = now - t_first
                    if out.finish_reason is FinishReason.ERROR:
                        done = True
                        raise GenerationError(out.error)
                    if out.token is not None:
                        stats.completion_tokens += 1
                    if out.finish_reason is not None:
                        done = True
                        stats.finish_reason = out.finish_reason
                    yield Chunk(out.text, out.token, out.finish_reason)
        finally:
            if not done:  # closed early or interrupted: end the sequence now, so no half-finished one stays behind
                sched.abort([seq_id])
                sched.reap_aborted()
            step_stats = sched.take_stats()
            stats.draft_tokens, stats.accepted_tokens = step_stats.draft_tokens, step_stats.accepted_tokens

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams) -> tuple[str, list[int]]:
        """Non-streaming: (text, generated token ids)."""
        pieces, ids = [], []
        for chunk in self.stream(prompt_ids, params):
            pieces.append(chunk.text)
            if chunk.token is not None:
                ids.append(chunk.token.token)
        return "".join(pieces), ids
