"""Sampling with per-row settings: each row of a batch has its own parameters, seed (torch.Generator) and
penalty counts, and its choice depends only on its own logits, never on the other rows.

Order of operations for a row (the order vLLM uses):
    penalties (repetition on prompt + output, presence/frequency on output) -> greedy argmax if temperature == 0
    -> temperature -> top-k -> top-p (over the top-k renormalized) -> min-p (relative to the most likely token)
    -> one uniform draw from the row's generator, inverted through the cumulative distribution.

Reported logprobs are those of the model's raw distribution (log_softmax of the logits before penalties and
temperature), for the chosen token and the `top_logprobs` most likely tokens.

Costs on CPU (V = 49152, 1 core): softmax ~70 us, a full sort ~7 ms, drawing V exponentials ~3 ms. So nothing here
sorts the whole vocabulary or draws per-token noise: top-p looks at a top-k candidate set that grows until it holds
the needed mass, and sampling draws a single uniform number.
"""

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MAX_TOP_LOGPROBS = 20
TOP_P_FIRST_CANDIDATES = 64  # candidates examined first for top-p; multiplied by 4 until they hold the mass


class SamplingError(ValueError):
    """Invalid sampling parameters (one line for the user)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (logit / p if > 0, else * p)
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # None: a fresh random seed
    logprobs: bool = False  # report the chosen token's logprob
    top_logprobs: int = 0  # and this many alternatives (implies logprobs)

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SamplingError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class SequenceSampler:
    """One sequence's sampling state: its parameters, its generator, and the token counts its penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int, device: torch.device | str = "cpu",
                 constraint=None):
        """constraint: a grammar.Matcher whose allowed tokens are the only ones drawn (None: free)."""
        self.params = params
        self.constraint = constraint
        self.device = torch.device(device)
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed)
        self.counts = None  # [V] int32: occurrences of each token in the output
        self.seen = None  # [V] bool: in the prompt or the output (repetition penalty)
        if params.has_penalties:
            self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=self.device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            if len(prompt_ids):
                self.seen[torch.as_tensor(list(prompt_ids), dtype=torch.long, device=self.device)] = True

    def observe(self, token: int) -> None:
        """Record a generated token (sample() does this for the tokens it picks)."""
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] fp32 -> penalized copy (or the same tensor when there is nothing to do)."""
        p = self.params
        if self.counts is None:
            return logits
        out = logits.clone()
        if p.repetition_penalty != 1:
            out = torch.where(self.seen, torch.where(out > 0, out / p.repetition_penalty, out * p.repetition_penalty), out)
        if p.frequency_penalty or p.presence_penalty:
            c = self.counts.float()
            out = out - c * p.frequency_penalty - (c > 0).float() * p.presence_penalty
        return out

    def draw(self, logits: torch.Tensor) -> int:
        """Sample one token id from penalized logits [V] fp32 with this sequence's settings and generator."""
        if self.params.greedy:
            return int(logits.argmax())
        probs, idx = self.distribution(logits)
        return self._invert(probs, idx)

    def distribution(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Penalized logits [V] fp32 -> (unnormalized probabilities, candidate ids or None for the whole vocabulary):
        what draw() samples from, after temperature, top-k, top-p and min-p."""
        p = self.params
        probs = torch.softmax(logits / p.temperature, dim=-1)  # [V]
        V = probs.shape[0]
        idx = None  # candidate ids when the distribution is cut to a sorted candidate set
        if p.top_k > 0 or p.top_p < 1:
            k = min(p.top_k, V) if p.top_k > 0 else min(TOP_P_FIRST_CANDIDATES, V)
            while True:
                probs_c, idx = torch.topk(probs, k)  # sorted, most likely first
                # Enough candidates once they hold top_p of the mass (only top-p needs the loop).
                if p.top_k > 0 or k == V or float(probs_c.sum()) >= p.top_p:
                    break
                k = min(4 * k, V)
            if p.top_k > 0:
                probs_c = probs_c / probs_c.sum()
            if p.top_p < 1:
                # Keep tokens while the mass before them is below top_p (the first is always kept).
                probs_c = torch.where(torch.cumsum(probs_c, 0) - probs_c < p.top_p, probs_c, 0.0)
            probs = probs_c
        if p.min_p > 0:
            probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
        return probs, idx

    def _invert(self, probs: torch.Tensor, idx: torch.Tensor | None) -> int:
        """One uniform draw from the generator, inverted through the cumulative distribution of probs."""
        cdf = torch.cumsum(probs, dim=0)
        u = torch.rand(1, generator=self.generator, device=self.device, dtype=cdf.dtype) * cdf[-1]
        # The first index whose cumulative mass exceeds u; zero-probability entries are never picked.
        j = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[0] - 1)
        return int(idx[j] if idx is not None else j)

    def verify(self, logits: torch.Tensor, draft: int | None) -> int:
        """The token for one position given the model's logits there [V] fp32 and a proposed token (speculative
        decoding; None: nothing proposed). Greedy: the argmax. Sampling: the draft is kept with probability p(draft)
        under the distribution draw() samples from, else a token is drawn from that distribution without the draft
        (renormalized); for a drafter that proposes one token for sure this gives exactly draw()'s distribution.
        Records the token (penalties)."""
        logits = self.penalize(logits)
        if self.params.greedy or draft is None:
            token = self.draw(logits)
        else:
            probs, idx = self.distribution(logits)
            at = int(draft) if idx is None else int((idx == draft).nonzero()[0, 0]) if bool((idx == draft).any()) else None
            total = probs.sum()
            u = torch.rand(1, generator=self.generator, device=self.device, dtype=probs.dtype)
            if at is not None and float(u) * float(total) < float(probs[at]):
                token = int(draft)
            else:
                if at is not None:
                    probs = probs.clone()
                    probs[at] = 0.0
                token = self._invert(probs, idx)
        self.observe(token)
        return token


def apply_token_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [V] fp32, contiguous; mask [ceil(V / 32)] int32 packed as the grammar engine writes it (bit b of word w
    allows token 32 w + b) -> logits with every disallowed token at -inf, in place.

    Integer ops on the floats' bits, one row at a time: on the 2-core EPYC masked_fill with a bool mask costs 2-5 ns
    per element, these ~1 (scripts/bench_grammar.py), and a row's temporaries stay in L2 where a batch's do not."""
    bits = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[: logits.shape[-1]]  # [V] 0/1
    keep = torch.from_numpy(bits).to(logits.device, torch.int32)
    x = logits.view(torch.int32)
    x.bitwise_and_(keep.neg())  # a disallowed token's bits all cleared
    x.bitwise_or_(keep.sub_(1).mul_(8388608))  # then set to -inf's (0xFF800000); allowed ones are untouched
    return logits


@dataclass
class SampleResult:
    token: int
    logprob: float | None = None  # of the chosen token under the raw model distribution
    top_logprobs: list[tuple[int, float]] | None = None  # (token, logprob), most likely first


def sample(logits: torch.Tensor, rows: Sequence[SequenceSampler]) -> list[SampleResult]:
    """logits [M, V] fp32 (one row per sequence, as runner.decode returns) -> one SampleResult per row.

    Each row's sampler records its chosen token (for penalties, and to advance its grammar). A constrained row's
    logits get the grammar's disallowed tokens at -inf (in place); reported logprobs stay those of the raw
    distribution."""
    if logits.dim() == 1:
        logits = logits[None]
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(rows)} samplers")
    constrained = [m for m, r in enumerate(rows) if r.constraint is not None]
    raw = {m: logits[m].clone() for m in constrained if rows[m].params.logprobs or rows[m].params.top_logprobs}
    for m in constrained:  # masked in place: the runner's logits are this step's alone
        apply_token_mask(logits[m], rows[m].constraint.fill())
    tokens: list[int | None] = [None] * len(rows)
    # Greedy rows without penalties: one batched argmax and a single host sync.
    plain = [m for m, r in enumerate(rows) if r.params.greedy and not r.params.has_penalties]
    if plain:
        picked = logits[plain].argmax(dim=-1).tolist() if len(plain) < len(rows) else logits.argmax(dim=-1).tolist()
        for m, t in zip(plain, picked):
            tokens[m] = t
    for m, r in enumerate(rows):
        if tokens[m] is None:
            tokens[m] = r.draw(r.penalize(logits[m]))
        r.observe(tokens[m])
        if r.constraint is not None:
            r.constraint.consume(tokens[m])
    results = [SampleResult(t) for t in tokens]
    for m, r in enumerate(rows):
        if r.params.logprobs or r.params.top_logprobs:
            lp = torch.log_softmax(raw.get(m, logits[m]), dim=-1)
            results[m].logprob = float(lp[tokens[m]])
            if r.params.top_logprobs:
                vals, ids = torch.topk(lp, r.params.top_logprobs)
                results[m].top_logprobs = list(zip(ids.tolist(), vals.tolist()))
    return results
