"""Constrained decoding: grammars (JSON Schema, any JSON object, tool calls) compiled to per-token masks by llguidance.

Why llguidance (scripts/bench_grammar.py, BENCHMARKS.md): on the 2-core EPYC a JSON-schema grammar compiles in ~1 ms
(xgrammar 6-61 ms, outlines-core 0.1-2.9 s per schema), a mask costs 11-18 us per token (median; xgrammar 2-13 us), it reads
byte-level BPE and SentencePiece tokenizers from the tokenizer.json alone, its JSON Schema coverage is the widest
(recursive $ref, anyOf, patterns, formats), and the wheel has no dependencies.

A `Grammars` is bound to one tokenizer (building its token trie takes 0.4 s for a 49k vocabulary, 1.5 s for 152k, so
it is built on first use). `compile()` checks a grammar and returns its text; each sequence gets its own `Matcher` from
it. A matcher writes the next token's allowed set as a packed bitmask [ceil(V / 32)] int32 (bit b of word w allows
token 32 w + b) and is told each token sampled; once the grammar is complete it allows only the end-of-sequence
tokens, so a constrained sequence ends with STOP, or with LENGTH at max_tokens with the partial text.
"""

import json
import threading
from collections.abc import Iterable

import numpy as np
import torch

MAX_SCHEMA_BYTES = 256 << 10  # a schema's JSON text; llguidance's own limits (below) bound the grammar it becomes
MAX_SCHEMA_DEPTH = 64  # nesting of a schema's objects and arrays


class GrammarError(ValueError):
    """A grammar or schema this server cannot enforce (one line for the user: a 400 naming `param`)."""

    def __init__(self, param: str, reason: str):
        super().__init__(f"{param}: {reason}")
        self.param = param


def _depth(obj, limit: int) -> int:
    """Nesting depth of a decoded JSON value, stopping once it passes `limit` (no recursion: hostile input)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def check_schema(schema, param: str) -> dict:
    """A JSON Schema from a request -> itself, or GrammarError naming `param` when it is not an object, too large or
    too deeply nested (cheap checks before the engine sees it)."""
    if isinstance(schema, bool):  # JSON Schema allows true (anything) and false (nothing)
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError(param, "must be a JSON Schema object")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise GrammarError(param, f"is larger than {MAX_SCHEMA_BYTES} bytes")
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise GrammarError(param, f"is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    return schema


def _json_options(strict: bool) -> dict:
    # One line with the usual separators: small models given free whitespace in JSON tend to emit newlines until
    # max_tokens. strict: unknown keywords are errors (OpenAI's strict mode); otherwise ignored.
    return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True,
            "lenient": not strict}


class Grammars:
    """Grammar texts for one tokenizer, and matchers that enforce them."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: Iterable[int]):
        self.hf, self.vocab_size, self.eos = hf_tokenizer, vocab_size, sorted(eos_token_ids)
        self._tok = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        """llguidance's view of the tokenizer, built once (0.4-1.5 s) on first use, from any thread."""
        with self._lock:
            if self._tok is None:
                import llguidance.hf

                self._tok = llguidance.hf.from_tokenizer(self.hf, n_vocab=self.vocab_size, eos_token=self.eos)
            return self._tok

    def json_schema(self, schema: dict, strict: bool = True, param: str = "schema") -> str:
        from llguidance import LLMatcher

        schema = check_schema(schema, param)
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, overrides=_json_options(strict))
        except ValueError as e:
            raise GrammarError(param, str(e)) from None
        return self.compile(grammar, param)

    def structured(self, schema: dict | None, strict: bool, tools: list[dict], parallel: bool, open_tag: str,
                   close_tag: str, schema_param: str = "schema", tools_param: str = "tools") -> str:
        """Output that is a JSON value valid against `schema` (None: not allowed), or tool calls (none if `tools`
        is empty): each `open_tag` newline {"name": <one of the tools>, "arguments": <its parameters>} newline
        `close_tag`, one call, or with `parallel` up to one per tool on separate lines.
        tools: [{"name", "parameters" (JSON Schema), "strict"}]."""
        from llguidance import LLMatcher

        if schema is not None and not tools:
            return self.json_schema(schema, strict, schema_param)
        rules, starts = [], []
        if schema is not None:
            self.json_schema(schema, strict, schema_param)  # alone first, so an error in it names its field
            schema = check_schema(schema, schema_param)
            rules.append(f"answer: %json {json.dumps({**schema, 'x-guidance': _json_options(strict)})}")
            starts.append("answer")
        if tools:
            for i, tool in enumerate(tools):
                params = check_schema(tool.get("parameters") or {"type": "object"}, f"{tools_param}[{i}].parameters")
                call = {"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False,
                        "x-guidance": _json_options(bool(tool.get("strict")))}
                rules.append(f"call{i}: %json {json.dumps(call)}")
            calls = " | ".join(f"call{i}" for i in range(len(tools)))
            rules.append(f'one: {self._tag(open_tag)} "\\n" ({calls}) "\\n" {self._tag(close_tag)}')
            more = len(tools) - 1 if parallel else 0  # at most one call per tool: small models otherwise repeat a call
            rules.append(f'calls: one ("\\n" one){{0,{more}}}' if more else "calls: one")
            starts.append("calls")
        if not starts:
            raise GrammarError(tools_param, "nothing to constrain the output to")
        lark = "\n".join([f"start: {' | '.join(starts)}", *rules])
        return self.compile(LLMatcher.grammar_from_lark(lark), tools_param if tools else schema_param)

    def _tag(self, text: str) -> str:
        """A tag in a lark rule: the token itself (`<[id]>`) where the tokenizer has it as one added token (Qwen2.5's
        <tool_call>: the model writes that token, and llguidance matches added tokens only by id), else the text."""
        ids = self.hf.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] in getattr(self.hf, "added_tokens_decoder", {}):
            return f"<[{ids[0]}]>"
        return json.dumps(text)

    def compile(self, grammar: str, param: str) -> str:
        """Check a grammar against this tokenizer -> the grammar, or GrammarError with the engine's reason."""
        from llguidance import LLMatcher

        try:
            tokenizer = self.tokenizer
        except Exception as e:  # noqa: BLE001 - e.g. a slow (Python) tokenizer, which llguidance cannot read
            raise GrammarError(param, f"this model's tokenizer cannot be used for constrained output ({e})") from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            reason = messages[0].splitlines()[0] if messages else "invalid grammar"
            raise GrammarError(param, reason)
        return grammar

    def matcher(self, grammar: str) -> "Matcher":
        return Matcher(self, grammar)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, grammars: Grammars, grammar: str):
        from llguidance import LLMatcher

        self.m = LLMatcher(grammars.tokenizer, grammar, log_level=0)
        self.eos = grammars.eos
        self.mask = torch.zeros((grammars.vocab_size + 31) // 32, dtype=torch.int32)  # [W] packed allowed tokens
        self.ready = False  # mask holds the allowed set for the next token

    def fill(self) -> torch.Tensor:
        """The allowed set for the next token -> self.mask (computed once per token; the scheduler may call this
        while the forward runs)."""
        if not self.ready:
            self.m.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
            if not self.mask.any():  # a matcher in error allows nothing: end the sequence rather than sample from -inf
                words = self.mask.numpy().view(np.uint32)
                for t in self.eos:
                    words[t // 32] |= np.uint32(1 << (t % 32))
            self.ready = True
        return self.mask

    def consume(self, token: int) -> bool:
        """Advance past the sampled token; False if the grammar did not allow it (then the matcher is in error)."""
        self.ready = False
        return self.m.consume_token(token) and not self.m.is_error()
