"""Grammars and tool-call parsing (tinyserve/generation/grammar.py, tools.py) on the default model's tokenizer: the
masks allow exactly what the grammar allows, a constrained row shares a batch with free rows without changing them,
and tool calls are found in streamed text however it is split."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from tinyserve.generation.grammar import GrammarError, Grammars
from tinyserve.generation.sampling import SamplingParams, SequenceSampler, apply_token_mask, sample
from tinyserve.generation.tools import CLOSE, CLOSE_TAG, OPEN, OPEN_TAG, CallParser, generic_messages


@pytest.fixture(scope="module")
def hf(default_fp16_dir):
    return AutoTokenizer.from_pretrained(default_fp16_dir)


@pytest.fixture(scope="module")
def grammars(hf):
    return Grammars(hf, 49152, [hf.eos_token_id])


def allowed(mask: torch.Tensor, vocab: int = 49152) -> set[int]:
    logits = apply_token_mask(torch.zeros(vocab), mask)
    return set(torch.nonzero(logits == 0).flatten().tolist())


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 49152])
def test_apply_token_mask_matches_the_bit_layout(vocab):
    g = torch.Generator().manual_seed(vocab)
    words = torch.randint(-2**31, 2**31 - 1, ((vocab + 31) // 32,), dtype=torch.int32, generator=g)
    logits = torch.randn(vocab, generator=g)
    out = apply_token_mask(logits.clone(), words)
    for t in range(vocab):
        bit = (int(words[t // 32]) >> (t % 32)) & 1
        assert (out[t] == logits[t]) if bit else (out[t] == float("-inf")), t


def test_greedy_decoding_under_a_schema_yields_valid_json(grammars, hf):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    m = grammars.matcher(grammars.structured(schema, True, [], False, OPEN_TAG, CLOSE_TAG))
    g = torch.Generator().manual_seed(0)
    sampler = SequenceSampler(SamplingParams(temperature=1.0, seed=1), [1], 49152, constraint=m)
    out = []
    for _ in range(40):  # random logits: only the grammar keeps the text valid
        t = sample(torch.randn(1, 49152, generator=g), [sampler])[0].token
        if t == hf.eos_token_id:
            break
        out.append(t)
    else:
        pytest.fail("the grammar never allowed EOS")
    obj = json.loads(hf.decode(out))
    assert set(obj) == {"n", "tag"} and obj["tag"] in ("a", "b") and isinstance(obj["n"], int)


def test_a_constrained_row_leaves_free_rows_alone(grammars):
    m = grammars.matcher(grammars.structured({"type": "object"}, False, [], False, OPEN_TAG, CLOSE_TAG))
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(3))
    rows = [SequenceSampler(SamplingParams(temperature=0), [1], 49152),
            SequenceSampler(SamplingParams(temperature=0), [1], 49152, constraint=m),
            SequenceSampler(SamplingParams(temperature=0, logprobs=True), [1], 49152)]
    res = sample(logits.clone(), rows)
    assert res[0].token == int(logits[0].argmax()) and res[2].token == int(logits[2].argmax())
    first = allowed(grammars.matcher(grammars.structured({"type": "object"}, False, [], False, OPEN_TAG, CLOSE_TAG)).fill())
    assert res[1].token in first and res[1].token != int(logits[1].argmax()) or int(logits[1].argmax()) in first
    assert res[2].logprob == pytest.approx(float(torch.log_softmax(logits[2], -1)[res[2].token]))


def test_forced_tool_calls_follow_the_hermes_syntax(grammars, hf):
    tools = [{"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
             {"name": "echo", "parameters": None}]
    grammar = grammars.structured(None, False, tools, True, OPEN_TAG, CLOSE_TAG)
    text = OPEN + '{"name": "add", "arguments": {"a": 2}}' + CLOSE + "\n" + OPEN + '{"name": "echo", "arguments": {}}' + CLOSE
    m = grammars.matcher(grammar).m
    ids = hf.encode(text, add_special_tokens=False)
    assert m.try_consume_tokens(ids) == len(ids) and m.is_accepting()
    bad = grammars.matcher(grammar).m
    ids = hf.encode(OPEN + '{"name": "sub", "arguments": {}}' + CLOSE, add_special_tokens=False)
    assert bad.try_consume_tokens(ids) < len(ids)


@pytest.mark.parametrize("schema, needle", [
    ({"type": "bogus"}, "bogus"),
    ({"$ref": "#/nope"}, "nope"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength"),
    ("not a schema", "JSON Schema object"),
])
def test_bad_schemas_are_grammar_errors_naming_the_field(grammars, schema, needle):
    with pytest.raises(GrammarError) as e:
        grammars.structured(schema, True, [], False, OPEN_TAG, CLOSE_TAG, schema_param="response_format.json_schema.schema")
    assert e.value.param == "response_format.json_schema.schema" and needle in str(e.value)


def test_too_deep_and_too_large_schemas_are_refused_before_the_engine(grammars):
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    with pytest.raises(GrammarError, match="nested more than"):
        grammars.structured(deep, True, [], False, OPEN_TAG, CLOSE_TAG)
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(5000)}}
    with pytest.raises(GrammarError, match="larger than"):
        grammars.structured(huge, True, [], False, OPEN_TAG, CLOSE_TAG)


TEXT = "Let me check.\n" + OPEN + '{"name": "get_weather", "arguments": {"city": "Paris"}}' + CLOSE + "\n" + \
       OPEN + '{"name": "nope", "arguments": {}}' + CLOSE + "\n"


@pytest.mark.parametrize("step", [1, 2, 5, 11, len(TEXT)])
def test_call_parser_finds_calls_however_the_text_is_split(step):
    p = CallParser({"get_weather"})
    content, calls = "", []
    for i in range(0, len(TEXT), step):
        c, k = p.push(TEXT[i:i + step])
        content, calls = content + c, calls + k
    c, k = p.flush()
    content, calls = content + c, calls + k
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    # an unknown tool's block stays text (with the whitespace between texts); trailing whitespace after calls is dropped
    assert content == "Let me check.\n\n" + OPEN + '{"name": "nope", "arguments": {}}' + CLOSE


def test_call_parser_never_shows_part_of_an_opening_tag():
    p = CallParser({"f"})
    assert p.push("answer <tool") == ("answer", [])
    assert p.push("_c") == ("", [])
    content, calls = p.push('all>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert content == "" and calls[0].name == "f"
    p = CallParser({"f"})
    assert p.push("a <tool") == ("a", [])
    assert p.push("box> b") == (" <toolbox> b", [])
    assert p.flush() == ("", [])


def test_generic_format_renders_calls_and_results_as_text():
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "tool_call_id": "1", "content": "42"}]
    out = generic_messages(msgs, tools)
    assert out[0]["role"] == "system" and '"name": "f"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": OPEN + '{"name": "f", "arguments": {"x": 1}}' + CLOSE}
    assert out[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}


def test_tags_that_are_added_tokens_are_matched_as_those_tokens(default_fp16_dir):
    """Qwen2.5's tokenizer has <tool_call> as one added token, which the model writes; the grammar must accept that
    token (llguidance matches added tokens only by id), and the text decodes back to the tag."""
    hf = AutoTokenizer.from_pretrained(default_fp16_dir)
    hf.add_tokens([OPEN_TAG, CLOSE_TAG])
    g = Grammars(hf, len(hf), [hf.eos_token_id])
    m = g.matcher(g.structured(None, False, [{"name": "f", "parameters": None}], False, OPEN_TAG, CLOSE_TAG))
    ids = hf.encode(OPEN + '{"name": "f", "arguments": {}}' + CLOSE, add_special_tokens=False)
    assert ids[0] == hf.convert_tokens_to_ids(OPEN_TAG)
    for t in ids:
        assert allowed(m.fill(), len(hf)) >= {t} and m.consume(t), hf.decode([t])
    assert allowed(m.fill(), len(hf)) == {hf.eos_token_id}
    assert hf.decode(ids, skip_special_tokens=True).startswith(OPEN_TAG)


TOOL_TEMPLATE = (  # a minimal Hermes-style template that takes tools, as Qwen2.5's does
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% endif %}"
    "</{{ m.role }}>\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_template_that_takes_tools_renders_them_and_the_history(default_fp16_dir):
    from tinyserve.generation.tokenizer import Tokenizer
    from tinyserve.generation.tools import chat_ids

    tok = Tokenizer(default_fp16_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "tool_call_id": "1", "content": "sunny"}]
    generic = tok.decode(chat_ids(tok, msgs, tools), skip_special_tokens=False)
    assert "<tool_response>\nsunny" in generic and "You can call functions" in generic  # SmolLM2's template: generic
    tok.hf.chat_template = TOOL_TEMPLATE
    native = tok.decode(chat_ids(tok, msgs, tools), skip_special_tokens=False)
    assert native.startswith("<tools>get_weather;</tools>")
    assert '<tool_call>get_weather {"city": "Oslo"}</tool_call>' in native and "<tool>sunny</tool>" in native
    assert native.endswith("<assistant>")


def test_json_or_tool_calls_and_its_errors_name_the_right_field(grammars, hf):
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}]
    grammar = grammars.structured({"type": "object", "properties": {"a": {"type": "string"}}}, False, tools, False,
                                  OPEN_TAG, CLOSE_TAG)
    for text in ['{"a": "b"}', OPEN + '{"name": "f", "arguments": {"x": 3}}' + CLOSE]:
        m = grammars.matcher(grammar).m
        ids = hf.encode(text, add_special_tokens=False)
        assert m.try_consume_tokens(ids) == len(ids) and m.is_accepting(), text
    with pytest.raises(GrammarError) as e:
        grammars.structured({"type": "bogus"}, False, tools, False, OPEN_TAG, CLOSE_TAG, schema_param="response_format")
    assert e.value.param == "response_format"
    with pytest.raises(GrammarError) as e:
        grammars.structured({"type": "object"}, False, [{"name": "g", "parameters": {"type": "bogus"}}], False,
                            OPEN_TAG, CLOSE_TAG, schema_param="response_format")
    assert e.value.param == "tools"


@pytest.mark.parametrize("schema", [
    {"enum": [f"value-{i}" for i in range(5000)]},
    {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]} for i in range(500)]},
    {"type": "string", "pattern": "^(a+)+b$"},
    {"type": "string", "pattern": "^[a-z]{1,100000}$"},
    {"type": "array", "items": {"type": "integer"}, "minItems": 100000},
], ids=["enum-5000", "anyOf-500", "nested-quantifiers", "huge-repeat", "minItems-100000"])
def test_large_or_pathological_schemas_compile_quickly(grammars, schema):
    import time

    t = time.perf_counter()
    m = grammars.matcher(grammars.structured(schema, False, [], False, OPEN_TAG, CLOSE_TAG))
    assert allowed(m.fill()) and time.perf_counter() - t < 10  # measured 0.00-0.06 s each
