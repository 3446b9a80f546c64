"""Structured output, tool calls and the Responses API through a real server on the real default model (SmolLM2-135M
INT4), with the official `openai` client: JSON-schema output that parses, a forced tool call, a tool round trip, and
responses.create plain and streamed; hostile schemas and tool histories get a 400 naming the field, and the server
stays up."""

import json

import pydantic
import pytest
import requests

from server_helpers import openai_client, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tinyserve_quantize.default_model import ensure_quantized_default

    ensure_quantized_default()
    with running_server(["--num-slots", "4"], tmp_path_factory.mktemp("server-structured") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


class City(pydantic.BaseModel):
    # Bounds the grammar enforces: a 135M model left free writes digits (or extra keys) until max_tokens
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population: int = pydantic.Field(ge=0, le=100_000_000)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The local time in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_parse_with_a_pydantic_model(client, model):
    r = client.chat.completions.parse(model=model, messages=ask("Describe Paris as JSON."), response_format=City,
                                      max_tokens=150, temperature=0)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name
    assert r.choices[0].finish_reason == "stop"


def test_json_schema_streamed_is_the_same_json(client, model):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema(), "strict": True}}
    whole = client.chat.completions.create(model=model, messages=ask("Describe Rome."), response_format=fmt,
                                           max_tokens=150, temperature=0)
    chunks = client.chat.completions.create(model=model, messages=ask("Describe Rome."), response_format=fmt,
                                            max_tokens=150, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    City.model_validate_json(text)


def test_json_object(client, model):
    # Any JSON object: a 135M model writes one but may not close it (it keeps adding keys), so a reply cut by
    # max_tokens is checked as the start of one; the grammar's validity is checked token by token in
    # test_generation_grammar.py.
    r = client.chat.completions.create(model=model, messages=ask("Give three colors as a JSON object."),
                                       response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text.startswith('{"') and finish in ("stop", "length")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)


def test_forced_tool_call_and_a_round_trip_with_its_result(client, model):
    messages = ask("What's the weather in Paris?")
    r = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    # The result goes back; tool_choice auto: the model answers in text (or calls again: either parses).
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    r = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], max_tokens=60, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


def test_required_tool_calls_stream_as_tool_call_deltas(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=ask("Weather and time in Oslo?"),
                                                 tools=[WEATHER, TIME], tool_choice="required", max_tokens=100,
                                                 temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and all(tc.function.name in ("get_weather", "get_time") for tc in calls)
    assert [tc.index for tc in calls] == list(range(len(calls)))
    for tc in calls:
        json.loads(tc.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_responses_plain_and_streamed(client, model):
    r = client.responses.create(model=model, input="What is the capital of France?", instructions="Answer briefly.",
                                max_output_tokens=40, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text
    events = list(client.responses.create(model=model, input="What is the capital of France?",
                                          instructions="Answer briefly.", max_output_tokens=40, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_json_schema_and_function_call_round_trip(client, model):
    r = client.responses.create(model=model, input="Describe Madrid.", max_output_tokens=150, temperature=0,
                                text={"format": {"type": "json_schema", "name": "city", "schema": City.model_json_schema(),
                                                 "strict": True}})
    City.model_validate_json(r.output_text)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"], "strict": True}
    r = client.responses.create(model=model, input="Weather in Lima?", tools=[tool], tool_choice="required",
                                max_output_tokens=60, temperature=0)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"]
    follow = client.responses.create(model=model, tools=[tool], max_output_tokens=40, temperature=0, input=[
        {"role": "user", "content": "Weather in Lima?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 18}'}])
    assert follow.status in ("completed", "incomplete") and follow.output


def test_a_schema_the_model_cannot_finish_in_max_tokens_ends_with_length(client, model):
    schema = {"type": "object", "properties": {"essay": {"type": "string", "minLength": 400}}, "required": ["essay"]}
    r = client.chat.completions.create(model=model, messages=ask("Write an essay."), max_tokens=12, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": schema}})
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith('{"essay": "')


def deep_schema(depth: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


HOSTILE = [
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": deep_schema(100)}}},
     "response_format.json_schema.schema"),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "response_format.json_schema.schema"),
    ("response_format", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("tool_choice", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("tool_choice", {"tool_choice": "required"}, "tool_choice"),
    ("tools", {"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "("}}}}}], "tool_choice": "required"}, "tools"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ("messages", {"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[f"{i}-{c[0]}" for i, c in enumerate(HOSTILE)])
def test_hostile_requests_get_a_400_naming_the_field(server, case):
    _, extra, param = case
    body = {"messages": ask("hi"), "max_tokens": 8} | extra
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def test_recursive_ref_schemas_are_enforced(client, model):
    tree = {"$defs": {"node": {"type": "object", "properties": {"name": {"type": "string"}, "children": {
        "type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["name", "children"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"}
    r = client.chat.completions.create(model=model, messages=ask("A family tree, as JSON."), max_tokens=120, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "tree", "schema": tree}})
    if r.choices[0].finish_reason == "stop":
        assert "children" in json.loads(r.choices[0].message.content)
    else:
        assert r.choices[0].message.content.startswith('{"name": "')


def test_previous_response_id_is_a_clear_400(server):
    r = requests.post(server.url + "/v1/responses", json={"input": "hi", "previous_response_id": "resp_1"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    assert "stateless" in r.json()["error"]["message"]


def test_prefix_cache_reports_cached_tokens(server, client, model):
    """A second request with the same long prompt reuses all of it but the last token (the server's steps are
    position-invariant, so any prefix is reusable; earlier requests share only the template's first tokens): the
    usage and /metrics say so, and the answer is the same."""
    from tinyserve_quantize.text_data import eval_text

    system = " ".join(eval_text().split()[:600])  # ~800 tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Who is the narrator?"}]
    first = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    second = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens < 10  # the chat template's opening tokens at most
    from tinyserve.runtime.backends import cpu_kernels_usable

    if cpu_kernels_usable("auto"):  # the server's backend: cpu-native steps are position-invariant
        assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    else:  # eager (an AVX2 CPU): whole prefill chunks (the server's default) are reused
        from tinyserve.generation.scheduler import SchedulerConfig

        chunk = SchedulerConfig().prefill_chunk
        assert second.usage.prompt_tokens_details.cached_tokens == (second.usage.prompt_tokens - 1) // chunk * chunk
    assert second.choices[0].message.content == first.choices[0].message.content
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    cached = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("tinyserve_prompt_tokens_cached_total")]
    assert cached and cached[0] >= 512
