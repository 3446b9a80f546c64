"""Grammar engines for constrained decoding, measured on this CPU: JSON-schema compile time and the per-token cost of
a next-token mask (compute the mask, then consume the token) while walking the tokens of a valid document.

    python scripts/bench_grammar.py --model ~/.cache/tinyserve/models/SmolLM2-135M-Instruct-fp16 [--model QWEN_DIR]

Engines are measured where installed: llguidance, xgrammar, outlines-core (outlines-core builds a whole index for
each schema up front; its per-token cost is a lookup). One thread, as the server's step would use one.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

SCHEMAS = {
    "person": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                          "email": {"type": "string", "format": "email"},
                                          "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
         "required": ["name", "age", "tags"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"]},
    ),
    "order": (
        {"type": "object", "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "status": {"enum": ["open", "paid", "shipped"]},
            "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number"}},
                "required": ["sku", "qty", "price"], "additionalProperties": False}},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
         "required": ["id", "status", "items", "note"], "additionalProperties": False},
        {"id": "ABC-1234", "status": "paid", "items": [{"sku": "kb-01", "qty": 2, "price": 19.5},
                                                        {"sku": "mouse", "qty": 1, "price": 7.25}], "note": None},
    ),
}


class Llguidance:
    name = "llguidance"

    def __init__(self, hf, vocab):
        import llguidance
        import llguidance.hf
        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
        self.mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        m = self.ll.LLMatcher(self.tok, grammar)
        assert not m.is_error(), m.get_error()
        return m

    def step(self, m, token):
        m.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        ok = m.consume_token(token)
        assert ok and not m.is_error(), m.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, hf, vocab):
        import xgrammar
        self.xg = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.mask = xgrammar.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        return self.xg.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema)))

    def step(self, m, token):
        m.fill_next_token_bitmask(self.mask)
        assert m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, hf, vocab):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        from tinyserve.server.engine import bytes_to_unicode
        self.oc, self.regex = outlines_core, build_regex_from_schema
        pieces: dict[bytes, list[int]] = {}
        decoder = json.loads(hf.backend_tokenizer.to_str()).get("decoder") or {}
        byte_level = "ByteLevel" in {d.get("type") for d in decoder.get("decoders", [decoder])}
        byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
        specials = set(hf.all_special_ids)
        for piece, i in hf.get_vocab().items():
            if i in specials or i >= vocab:
                continue
            raw = bytes(byte_of_char.get(c, 0x3F) for c in piece) if byte_level else piece.replace("\u2581", " ").encode()
            pieces.setdefault(raw, []).append(i)
        self.vocab = outlines_core.Vocabulary(hf.eos_token_id, pieces)
        self.mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def compile(self, schema):
        return self.oc.Guide(self.oc.Index(self.regex(json.dumps(schema)), self.vocab))

    def step(self, g, token):
        g.write_mask_into(self.mask.data_ptr(), self.mask.numel(), 4)
        g.advance(token)


def apply_cost(vocab: int, rows: int, repeat: int = 200) -> tuple[float, float]:
    """Microseconds per row to mask `rows` rows of logits [rows, V] fp32 with packed masks: sampling.apply_token_mask
    (one row at a time, in place) and, for comparison, torch's masked_fill with the unpacked bool mask of all rows."""
    import numpy as np

    from tinyserve.generation.sampling import apply_token_mask
    logits = torch.randn(rows, vocab)
    masks = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32)

    def ours():
        for r in range(rows):
            apply_token_mask(logits[r], masks[r])

    def masked_fill():
        bits = np.unpackbits(masks.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
        return logits.masked_fill(torch.from_numpy(bits) == 0, float("-inf"))

    out = []
    for f in (ours, masked_fill):
        f()
        t = time.perf_counter()
        for _ in range(repeat):
            f()
        out.append((time.perf_counter() - t) / repeat / rows * 1e6)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a model folder with a tokenizer (repeatable)")
    ap.add_argument("--repeat", type=int, default=5, help="walks of each document (best is reported)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    print("| tokenizer | V | engine | tokenizer setup s | schema | compile ms | mask+consume us/token (median, p99) |")
    print("|---|---|---|---|---|---|---|")
    for folder in a.model:
        hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
        for engine in (Llguidance, Xgrammar, OutlinesCore):
            t = time.perf_counter()
            try:
                e = engine(hf, vocab)
            except ImportError:
                continue
            setup = time.perf_counter() - t
            for name, (schema, doc) in SCHEMAS.items():
                tokens = hf.encode(json.dumps(doc), add_special_tokens=False)
                t = time.perf_counter()
                try:
                    e.compile(schema)
                except Exception as err:  # noqa: BLE001 - an engine that cannot take the schema is a result
                    print(f"| {Path(folder).name} | {vocab} | {e.name} | {setup:.2f} | {name} | fails: {str(err)[:60]} | |")
                    continue
                compile_ms = (time.perf_counter() - t) * 1e3
                best = None
                for _ in range(a.repeat):
                    m, times = e.compile(schema), []
                    for tok in tokens:
                        t = time.perf_counter()
                        e.step(m, tok)
                        times.append((time.perf_counter() - t) * 1e6)
                    if best is None or statistics.median(times) < statistics.median(best):
                        best = times
                p99 = sorted(best)[int(0.99 * (len(best) - 1))]
                print(f"| {Path(folder).name} | {vocab} | {e.name} | {setup:.2f} | {name} ({len(tokens)} tokens) | "
                      f"{compile_ms:.1f} | {statistics.median(best):.0f}, {p99:.0f} |", flush=True)
        for rows in (1, 16):
            ours, fill = apply_cost(vocab, rows)
            print(f"| {Path(folder).name} | {vocab} | apply the masks to {rows} rows of logits | | | | "
                  f"{ours:.0f} per row (masked_fill: {fill:.0f}) |")


if __name__ == "__main__":
    main()
