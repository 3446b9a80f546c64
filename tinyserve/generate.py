"""Single-sequence streaming generation: the loop behind `generate`, `chat` and the benchmark.

A `Session` owns one KV cache slot. Each call to `stream` prefills only the part of the prompt that differs from
what the slot already holds (a chat turn re-sends the whole history; its unchanged prefix is not recomputed), then
decodes token by token, yielding text as soon as it is safe to show.
"""

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tinyserve.runner import ContextOverflow, ModelRunner
from tinyserve.sampling import SampleResult, SamplingParams, SequenceSampler, sample
from tinyserve.tokenizer import IncrementalDetokenizer, StopStrings, Tokenizer


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
    token: SampleResult | None = None  # None for the final flush
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length" (max_tokens or context full)


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV the slot already held (not recomputed)
    completion_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first token sampled
    decode_s: float = 0.0  # first token -> last token
    finish_reason: str | None = None

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one (which the prefill produced)."""
        return (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s > 0 else 0.0


class Session:
    """One sequence slot of a runner, reused across calls (turns of a chat, or repeated generations)."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, slot: int | None = None):
        self.runner, self.tok = runner, tokenizer
        self.slot = runner.alloc_slot() if slot is None else slot
        self.cached: list[int] = []  # token ids whose keys/values sit in the slot, in order
        self.eos = tokenizer.eos_token_ids | frozenset(runner.cfg.eos_token_ids)
        self.stats = Stats()

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[Chunk]:
        """Generate from prompt_ids; yields Chunks, the last with finish_reason set. Updates self.stats as it goes.

        Raises ContextOverflow before doing any work when the prompt alone does not fit the context."""
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise ContextOverflow(f"the prompt has {len(prompt)} tokens; the context holds {self.max_seq_len} (prompt and reply together)")
        stats = self.stats = Stats(prompt_tokens=len(prompt))
        t0 = time.perf_counter()
        runner, slot = self.runner, self.slot
        # An interrupted step may have left the slot shorter than our record: trust the runner.
        self.cached = self.cached[: runner.length(slot)]
        reuse = _common_prefix(self.cached, prompt)
        reuse = min(reuse, len(prompt) - 1)  # the last prompt token must run to produce logits
        stats.cached_tokens = reuse
        self.cached = self.cached[:reuse]
        logits = runner.prefill(slot, prompt[reuse:], start=reuse)
        self.cached = prompt[:]

        sampler = SequenceSampler(params.sampling, prompt, runner.cfg.vocab_size, runner.device)
        detok = IncrementalDetokenizer(self.tok, prompt)
        stops = StopStrings(params.stop)
        t_first = None
        while True:
            res = sample(logits, [sampler])[0]
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                stats.ttft_s = now - t0
            stats.decode_s = now - t_first
            if res.token in self.eos and not params.ignore_eos:
                yield from self._finish(detok, stops, "stop")
                return
            stats.completion_tokens += 1
            text = stops.push(detok.push(res.token))
            if stops.stopped:
                stats.finish_reason = "stop"
                yield Chunk(text, res, "stop")
                return
            if stats.completion_tokens >= params.max_tokens or runner.length(slot) >= self.max_seq_len:
                yield Chunk(text, res)
                yield from self._finish(detok, stops, "length")
                return
            yield Chunk(text, res)
            logits = runner.decode([slot], [res.token])
            self.cached.append(res.token)

    def _finish(self, detok: IncrementalDetokenizer, stops: StopStrings, reason: str) -> Iterator[Chunk]:
        text = stops.push(detok.flush())
        if stops.stopped:
            reason = "stop"
        else:
            text += stops.flush()
        self.stats.finish_reason = reason
        yield Chunk(text, None, reason)

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams) -> tuple[str, list[int]]:
        """Non-streaming: (text, generated token ids)."""
        pieces, ids = [], []
        for chunk in self.stream(prompt_ids, params):
            pieces.append(chunk.text)
            if chunk.token is not None:
                ids.append(chunk.token.token)
        return "".join(pieces), ids

    def close(self) -> None:
        self.runner.free_slot(self.slot)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
