"""Chat agreement: how closely a quantized model answers like the unquantized one, greedy, on short instructions.

Perplexity on prose says little about what a chat user sees first. This measure asks the chat question directly. Each
instruction (the built-in 50 of data/chat_instructions.txt, or a file with one per line) goes through the model's
chat template (its default system prompt included), then:
- the reference (unquantized) model greedy-decodes up to ANSWER_TOKENS tokens (stopping at end of sequence);
- top-1 agreement: the quantized model reads the prompt plus the reference's first TOP1_TOKENS answer tokens
  (teacher forcing) and predicts each of them; the share of positions where its most likely token is the reference's;
- first-line match: the quantized model greedy-decodes its own answer; the share of instructions whose first line
  (the answer's text up to its first newline, stripped) equals the reference's. A first line longer than
  ANSWER_TOKENS tokens is compared as far as both were decoded.
Both models run through transformers in fp32 (packed folders dequantized by the layout's reference, as for
perplexity), so the measure is of the weights, not of a runtime's kernels.
"""

import inspect
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch
from transformers import DynamicCache

ANSWER_TOKENS = 64
TOP1_TOKENS = 32
INSTRUCTIONS_FILE = "chat_instructions.txt"


@cache
def builtin_instructions() -> tuple[str, ...]:
    text = resources.files("tinyserve_quantize").joinpath("data", INSTRUCTIONS_FILE).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def prompt_ids(tokenizer, instructions: list[str] | tuple[str, ...]) -> list[list[int]]:
    out = []
    for text in instructions:
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _left_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, L] and attention mask [B, L], padded on the left so every sequence ends at the last column."""
    L = max(map(len, seqs))
    ids = torch.tensor([[pad] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_answers(model, prompts: list[list[int]], eos: set[int], max_new: int = ANSWER_TOKENS,
                   pad: int = 0) -> list[list[int]]:
    """Greedy answers of all prompts in one left-padded batch with a KV cache; each ends at (and keeps) its first
    end-of-sequence token or after max_new tokens."""
    ids, mask = _left_padded(prompts, pad)
    answers: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    # transformers 5.25 renamed the forward's cache argument (past_key_values -> cache); the cache fills in place.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache_arg = {name: DynamicCache()}
    x = ids
    for _ in range(max_new):
        pos = _positions(mask)[:, -x.shape[1]:]
        out = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **cache_arg)
        nxt = out.logits[:, -1].argmax(-1)  # [B]
        for j, t in enumerate(nxt.tolist()):
            if not done[j]:
                answers[j].append(t)
                done[j] = t in eos
        if all(done):
            break
        x = nxt[:, None]
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
    return answers


@torch.no_grad()
def top1_matches(model, prompts: list[list[int]], references: list[list[int]], pad: int = 0) -> tuple[int, int]:
    """Teacher-forced: (positions where the model's argmax is the reference's next token, positions), over each
    reference's first TOP1_TOKENS tokens."""
    refs = [r[:TOP1_TOKENS] for r in references]
    ids, mask = _left_padded([p + r[:-1] for p, r in zip(prompts, refs)], pad)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
    hits = total = 0
    for j, r in enumerate(refs):
        pred = logits[j, ids.shape[1] - len(r):].argmax(-1)  # the last len(r) positions predict r
        hits += int((pred == torch.tensor(r)).sum())
        total += len(r)
    return hits, total


def first_line(tokenizer, answer: list[int]) -> str:
    return tokenizer.decode(answer, skip_special_tokens=True).strip().split("\n")[0].strip()


@dataclass
class Reference:
    """The unquantized model's answers to the instructions."""

    instructions: list[str]
    prompts: list[list[int]]
    answers: list[list[int]]
    first_lines: list[str]
    eos: set[int]
    pad: int
    max_new: int


def reference_answers(model, tokenizer, instructions: list[str] | tuple[str, ...] | None = None,
                      max_new: int = ANSWER_TOKENS) -> Reference:
    instructions = list(builtin_instructions() if instructions is None else instructions)
    prompts = prompt_ids(tokenizer, instructions)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    answers = greedy_answers(model.eval(), prompts, eos, max_new, pad)
    return Reference(instructions, prompts, answers, [first_line(tokenizer, a) for a in answers], eos, pad, max_new)


def agreement(model, tokenizer, ref: Reference) -> dict:
    """The quantized model's agreement with the reference: top1 (share of teacher-forced positions), first_line
    (share of instructions), and each instruction's two first lines."""
    model.eval()
    hits, total = top1_matches(model, ref.prompts, ref.answers, ref.pad)
    answers = greedy_answers(model, ref.prompts, ref.eos, ref.max_new, ref.pad)
    lines = [first_line(tokenizer, a) for a in answers]
    same = [a == b for a, b in zip(lines, ref.first_lines)]
    return {
        "top1": hits / total,
        "first_line": sum(same) / len(same),
        "instructions": len(same),
        "answers": [{"instruction": i, "reference": r, "quantized": q}
                    for i, r, q in zip(ref.instructions, ref.first_lines, lines)],
    }
