"""The HTTP API against a real server process (a tiny random-weight Llama with the real SmolLM2 tokenizer), driven by
the official `openai` client (sync and async) and by raw HTTP: every endpoint, streaming and not, usage numbers
against the tokenizer, stop strings, seeds, logprobs, n, concurrency, disconnects, overload, API key and CORS."""

import asyncio
from http.client import HTTPConnection
import json
import re
import time

import aiohttp
import openai
import requests
import pytest
from transformers import AutoTokenizer

from server_helpers import Http, ServerProcess, is_openai_error, parse_sse

KEY = "test-key-123"
MODEL = "tiny"
SLOTS = 8
MAX_WAITING = 8
CONTEXT = 512
ORIGIN = "http://allowed.example"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    args = ["--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--num-slots", str(SLOTS),
            "--max-waiting", str(MAX_WAITING), "--max-seq-len", str(CONTEXT), "--threads", "1", "--api-key", KEY,
            "--cors-origin", ORIGIN, "--max-body-bytes", str(1 << 20), "--prefill-chunk", "64"]
    srv = ServerProcess(args, tmp_path_factory.mktemp("server-api") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        status = srv.terminate()
    assert status == 0, srv.log()[-2000:]


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with Http(server.url, {"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def chat_prompt_len(tok, messages) -> int:
    return len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def stream_raw(http: Http, path: str, body: dict) -> list:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return parse_sse(r.text)


def health(server) -> dict:
    return requests.get(server.url + "/health", timeout=10).json()


# ---- endpoints --------------------------------------------------------------------------------------------------


def test_health_models_and_metrics_endpoints(server, http, client):
    assert set(server.health_codes) <= {200, 503} and server.health_codes[-1] == 200  # 503 only while loading
    h = requests.get(server.url + "/health", timeout=10)  # public: no API key
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["slots"] == SLOTS
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "model"
    m = http.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("tinyserve_requests_running", "tinyserve_requests_waiting", "tinyserve_prompt_tokens_total",
                 "tinyserve_generation_tokens_total", "tinyserve_time_to_first_token_seconds_bucket",
                 "tinyserve_time_per_output_token_seconds_bucket"):
        assert name in m.text
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "<title>tinyserve chat</title>" in page.text
    assert requests.get(server.url + "/static/app.js", timeout=10).status_code == 200


def test_api_key_is_required_except_for_health_and_page(server):
    for path in ("/v1/models", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = requests.get(server.url + path, headers=headers, timeout=10)
            assert r.status_code == 401 and is_openai_error(r.json()), (path, headers)
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_cors(server):
    pre = requests.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    bad = requests.options(server.url + "/v1/chat/completions", timeout=10, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in bad.headers
    r = requests.get(server.url + "/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = requests.get(server.url + "/v1/models", headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"}, timeout=10)
    assert "access-control-allow-origin" not in r.headers


# ---- chat completions -------------------------------------------------------------------------------------------


def test_chat_completion_object_and_usage(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert abs(r.created - time.time()) < 600
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == chat_prompt_len(tok, MESSAGES)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    # The reply is what the tokenizer makes of the generated tokens: re-encoding it gives back 12 tokens' worth of text.
    assert choice.message.content and tok.decode(tok.encode(choice.message.content, add_special_tokens=False)) == choice.message.content


def test_chat_stream_wire_format(http, client):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    events = stream_raw(http, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    first, *content, final, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["choices"][0]["finish_reason"] is None
    assert all(c["choices"][0]["finish_reason"] is None and set(c["choices"][0]["delta"]) == {"content"} for c in content)
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])  # with include_usage, every other chunk carries usage: null
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    assert streamed == whole.choices[0].message.content
    u = whole.usage
    assert usage["usage"] == {"prompt_tokens": u.prompt_tokens, "completion_tokens": 10, "total_tokens": u.prompt_tokens + 10,
                              "prompt_tokens_details": {"cached_tokens": 0}}  # the prompt is shorter than a prefill chunk

    plain = stream_raw(http, "/v1/chat/completions", {**body, "stream_options": None})
    assert not any(isinstance(e, dict) and ("usage" in e and e["usage"]) for e in plain)


def test_streaming_with_sync_and_async_openai_clients(server, client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    sync_text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True) if c.choices)

    async def run_async():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as ac:
            stream = await ac.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
            parts, usage = [], None
            async for c in stream:
                if c.choices:
                    parts.append(c.choices[0].delta.content or "")
                usage = c.usage or usage
            whole_async = await ac.chat.completions.create(**kwargs)
            return "".join(parts), usage, whole_async.choices[0].message.content

    async_text, usage, whole_async = asyncio.run(run_async())
    assert sync_text == whole == async_text == whole_async
    assert usage.completion_tokens == 16


def test_logprobs_match_the_tokens(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert b"".join(bytes(t.bytes) for t in content).decode() == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # Greedy: the chosen token is a most likely one (this random model's bf16 logits can tie exactly).
        best = [a.token for a in t.top_logprobs if a.logprob == pytest.approx(lps[0], abs=1e-6)]
        assert t.token in best and t.logprob == pytest.approx(lps[0], abs=1e-6)
    no_lp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert no_lp.choices[0].logprobs is None and no_lp.choices[0].message.content == r.choices[0].message.content
    # Streaming: the chunks' logprobs together are the same list.
    streamed = [t for c in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                                          logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_stop_strings(client, http):
    base = dict(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0)
    full = client.chat.completions.create(**base).choices[0].message.content
    assert len(full) > 12
    stop = full[8:11]
    cut = full[: full.index(stop)]
    r = client.chat.completions.create(**base, stop=stop)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(**base, stop=["zzzz-never", stop])
    assert r.choices[0].message.content == cut
    events = stream_raw(http, "/v1/chat/completions", {**base, "stop": [stop], "stream": True})
    chunks = [e for e in events if isinstance(e, dict)]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == cut  # no piece of the stop leaks
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeds_and_n(client):
    base = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(**base, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**base, seed=1234).choices[0].message.content
    c = client.chat.completions.create(**base, seed=4321).choices[0].message.content
    assert a == b and a != c
    r = client.chat.completions.create(**base, seed=1234, n=3)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in r.choices]
    assert texts[0] == a and len(set(texts)) == 3  # choice j samples with seed + j
    assert r.usage.completion_tokens == 48
    again = client.chat.completions.create(**base, seed=1234, n=3)
    assert [ch.message.content for ch in again.choices] == texts
    # Streaming n=2: each choice has its role chunk, its content and its own final chunk.
    parts, finish, roles = {0: "", 1: ""}, {}, set()
    for chunk in client.chat.completions.create(**base, seed=1234, n=2, stream=True):
        for ch in chunk.choices:
            if ch.delta.role:
                roles.add(ch.index)
            parts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert roles == {0, 1} and finish == {0: "length", 1: "length"} and [parts[0], parts[1]] == texts[:2]


def test_sampling_parameters_change_the_output(client):
    base = dict(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0)
    greedy = client.chat.completions.create(**base, logprobs=True)
    tokens = [t.token for t in greedy.choices[0].logprobs.content]
    assert len(set(tokens)) < len(tokens), "the greedy reply repeats tokens, so penalties must change it"
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        r = client.chat.completions.create(**base, **extra, logprobs=True)
        penalized = [t.token for t in r.choices[0].logprobs.content]
        assert penalized != tokens and len(set(penalized)) > len(set(tokens[: len(penalized)])) - 1, extra
    # top_k=1 is greedy whatever the temperature; a tiny top_p keeps one token (ties in the bf16 logits may break
    # differently from argmax, so it is compared across seeds rather than with the greedy text).
    text = greedy.choices[0].message.content
    hot = dict(base, temperature=1.5)
    assert client.chat.completions.create(**hot, seed=7).choices[0].message.content != text
    assert client.chat.completions.create(**hot, seed=7, extra_body={"top_k": 1}).choices[0].message.content == text
    narrow = {client.chat.completions.create(**hot, seed=seed, top_p=1e-6).choices[0].message.content for seed in (1, 2)}
    assert len(narrow) == 1


def test_max_completion_tokens_and_default_length(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    # Without a limit a reply may fill the context: prompt + completion == context unless EOS came first.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT or r.choices[0].finish_reason == "stop"


# ---- completions ------------------------------------------------------------------------------------------------


def test_completions(client, tok, http):
    prompt = "Once upon a time"
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"  # the endpoint's default max_tokens
    text = r.choices[0].text
    ids = tok(prompt)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0)
    assert by_ids.choices[0].text == text
    streamed = stream_raw(http, "/v1/completions", {"model": MODEL, "prompt": prompt, "temperature": 0, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    chunks = [e for e in streamed if isinstance(e, dict)]
    assert all(c["object"] == "text_completion" for c in chunks) and streamed[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 16
    # A batch of prompts with n=2: choices prompt-major.
    r = client.completions.create(model=MODEL, prompt=[prompt, "The sea"], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == text[: len(r.choices[0].text)]
    assert r.usage.prompt_tokens == len(ids) + len(tok("The sea")["input_ids"]) and r.usage.completion_tokens == 16
    # Legacy logprobs: parallel arrays.
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(len(t) == 2 for t in lp.top_logprobs)


# ---- load: concurrency, disconnects, overload -----------------------------------------------------------------


def test_eight_concurrent_streams_equal_sequential(server, client):
    prompts = [[{"role": "user", "content": f"Tell me fact number {i} about {topic}."}]
               for i, topic in enumerate(["owls", "rivers", "glass", "tea", "comets", "bees", "salt", "maps"])]
    kwargs = dict(model=MODEL, max_tokens=40, temperature=0)
    sequential = [client.chat.completions.create(messages=m, **kwargs).choices[0].message.content for m in prompts]
    assert len(set(sequential)) == len(prompts)

    async def one(ac, messages):
        parts = []
        async for c in await ac.chat.completions.create(messages=messages, stream=True, **kwargs):
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
        return "".join(parts)

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as ac:
            return await asyncio.gather(*(one(ac, m) for m in prompts))

    assert asyncio.run(all_at_once()) == sequential


def metric(server, name: str, labels: str = "") -> float:
    text = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot_within_a_second(server, stream):
    cancelled = metric(server, "tinyserve_sequences_finished_total", '{reason="cancelled"}')
    body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": CONTEXT - 60, "temperature": 0, "stream": stream})
    conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    if stream:
        resp = conn.getresponse()
        chunks = 0
        while chunks < 2:
            if resp.readline().startswith(b"data: "):
                chunks += 1
    else:
        deadline = time.monotonic() + 30
        while health(server)["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    assert health(server)["slots_free"] == SLOTS - 1
    conn.sock.close()  # the client goes away mid-generation
    conn.close()
    t0 = time.monotonic()
    while health(server)["slots_free"] != SLOTS:
        assert time.monotonic() - t0 < 1.0, "the slot was not freed within a second"
        time.sleep(0.01)
    assert metric(server, "tinyserve_sequences_finished_total", '{reason="cancelled"}') == cancelled + 1
    assert metric(server, "tinyserve_requests_running") == 0


def test_overload_answers_429_with_retry_after(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 300, "temperature": 0}

    async def post(session):
        async with session.post(server.url + "/v1/chat/completions", json=body) as r:
            return r.status, r.headers.get("Retry-After"), await r.json()

    async def flood():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            return await asyncio.gather(*(post(session) for _ in range(SLOTS + MAX_WAITING + 8)))

    responses = asyncio.run(flood())
    codes = [status for status, _, _ in responses]
    assert set(codes) == {200, 429} and codes.count(200) >= SLOTS
    for status, retry_after, body in responses:
        if status == 429:
            assert retry_after.isdigit() and is_openai_error(body) and body["error"]["type"] == "rate_limit_error"
    assert health(server)["slots_free"] == SLOTS
    assert metric(server, "tinyserve_requests_rejected_queue_full_total") >= codes.count(429)


# ---- bad input -------------------------------------------------------------------------------------------------

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
OK_MSG = [{"role": "user", "content": "hi"}]


def chat(**kw) -> bytes:
    return json.dumps({"model": MODEL, "messages": OK_MSG, "max_tokens": 4, **kw}).encode()


def comp(**kw) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4, **kw}).encode()


BAD_INPUTS = [
    # (name, method, path, body, expected status, expected param or None)
    ("truncated json", "POST", CHAT, b'{"messages": [', 400, None),
    ("empty body", "POST", CHAT, b"", 400, None),
    ("top-level array", "POST", CHAT, b"[]", 400, None),
    ("top-level string", "POST", CHAT, b'"hello"', 400, None),
    ("invalid utf-8", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}', 400, None),
    ("NaN literal", "POST", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
    ("Infinity literal", "POST", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}', 400, None),
    ("nested 100k deep", "POST", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("messages missing", "POST", CHAT, json.dumps({"model": MODEL}).encode(), 400, "messages"),
    ("messages a string", "POST", CHAT, chat(messages="hi"), 400, "messages"),
    ("messages empty", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("message not an object", "POST", CHAT, chat(messages=[1]), 400, "messages[0]"),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    ("tool message without tool_call_id", "POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].tool_call_id"),
    ("function role", "POST", CHAT, chat(messages=[{"role": "function", "content": "x"}]), 400, "messages[0].role"),
    ("role missing", "POST", CHAT, chat(messages=[{"content": "x"}]), 400, "messages[0].role"),
    ("content missing", "POST", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("content a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("image content part", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages[0].content[0].type"),
    ("max_tokens a string", "POST", CHAT, chat(max_tokens="ten"), 400, "max_tokens"),
    ("max_tokens negative", "POST", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens 1e30", "POST", CHAT, chat(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens 1e308 float", "POST", CHAT, chat(max_tokens=1e308), 400, "max_tokens"),
    ("max_tokens boolean", "POST", CHAT, chat(max_tokens=True), 400, "max_tokens"),
    ("max_tokens past context", "POST", CHAT, chat(max_tokens=CONTEXT), 400, "max_tokens"),
    ("max_completion_tokens past context", "POST", CHAT, chat(max_completion_tokens=CONTEXT * 4), 400, "max_completion_tokens"),
    ("prompt longer than context", "POST", CHAT, chat(messages=[{"role": "user", "content": "word " * 2000}]), 400, "messages"),
    ("temperature 5", "POST", CHAT, chat(temperature=5), 400, "temperature"),
    ("temperature negative", "POST", CHAT, chat(temperature=-0.5), 400, "temperature"),
    ("temperature a string", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_p 1.5", "POST", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top_k -5", "POST", CHAT, chat(top_k=-5), 400, "top_k"),
    ("min_p 2", "POST", CHAT, chat(min_p=2), 400, "min_p"),
    ("presence_penalty 3", "POST", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty -2.5", "POST", CHAT, chat(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("seed a string", "POST", CHAT, chat(seed="abc"), 400, "seed"),
    ("seed 2**70", "POST", CHAT, chat(seed=2**70), 400, "seed"),
    ("stop a number", "POST", CHAT, chat(stop=5), 400, "stop"),
    ("five stops", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop", "POST", CHAT, chat(stop=[""]), 400, "stop"),
    ("n zero", "POST", CHAT, chat(n=0), 400, "n"),
    ("n 100", "POST", CHAT, chat(n=100), 400, "n"),
    ("top_logprobs 21", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=3), 400, "top_logprobs"),
    ("logprobs a string", "POST", CHAT, chat(logprobs="yes"), 400, "logprobs"),
    ("stream a string", "POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("tool not a function", "POST", CHAT, chat(tools=[{"type": "web_search"}]), 400, "tools[0].type"),
    ("tool name with spaces", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b"}}]), 400, "tools[0].function.name"),
    ("tool_choice unknown", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="always"), 400, "tool_choice"),
    ("logit_bias", "POST", CHAT, chat(logit_bias={"1": 5}), 400, "logit_bias"),
    ("response_format a string", "POST", CHAT, chat(response_format="json"), 400, "response_format"),
    ("response_format schema a list", "POST", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}), 400, "response_format.json_schema.schema"),
    ("completions: response_format", "POST", COMP, comp(response_format={"type": "json_object"}), 400, "response_format"),
    ("completions: tools", "POST", COMP, comp(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("responses: input missing", "POST", "/v1/responses", json.dumps({"model": MODEL}).encode(), 400, "input"),
    ("responses: previous_response_id", "POST", "/v1/responses", json.dumps({"input": "x", "previous_response_id": "r"}).encode(), 400, "previous_response_id"),
    ("responses: image input", "POST", "/v1/responses", json.dumps({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}).encode(), 400, "input[0].content[0].type"),
    ("responses: bad text.format", "POST", "/v1/responses", json.dumps({"input": "x", "text": {"format": {"type": "yaml"}}}).encode(), 400, "text.format.type"),
    ("model a number", "POST", CHAT, chat(model=5), 400, "model"),
    ("unknown model", "POST", CHAT, chat(model="gpt-4o"), 404, "model"),
    ("completions: prompt missing", "POST", COMP, json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    ("completions: prompt a number", "POST", COMP, comp(prompt=123), 400, "prompt"),
    ("completions: empty prompt list", "POST", COMP, comp(prompt=[]), 400, "prompt"),
    ("completions: empty string", "POST", COMP, comp(prompt=""), 400, "prompt"),
    ("completions: token id past vocab", "POST", COMP, comp(prompt=[10**9]), 400, "prompt"),
    ("completions: negative token id", "POST", COMP, comp(prompt=[-1]), 400, "prompt"),
    ("completions: logprobs 50", "POST", COMP, comp(logprobs=50), 400, "logprobs"),
    ("completions: echo", "POST", COMP, comp(echo=True), 400, "echo"),
    ("completions: suffix", "POST", COMP, comp(suffix="end"), 400, "suffix"),
    ("completions: best_of 3", "POST", COMP, comp(best_of=3), 400, "best_of"),
    ("completions: 20 prompts", "POST", COMP, comp(prompt=["a"] * 20), 400, "prompt"),
    ("10 MB body", "POST", CHAT, b'{"messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}', 413, None),
    ("GET on a POST route", "GET", CHAT, None, 405, None),
    ("unknown path", "POST", "/v1/embeddings", chat(), 404, None),
]


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(server, client, http):
    assert len(BAD_INPUTS) >= 30
    failures = []
    for name, method, path, body, status, param in BAD_INPUTS:
        r = http.request(method, path, data=body, headers={"Content-Type": "application/json"})
        try:
            err = r.json()
        except ValueError:
            failures.append(f"{name}: not JSON: {r.text[:200]!r}")
            continue
        if r.status_code != status or not is_openai_error(err) or (param is not None and err["error"]["param"] != param):
            failures.append(f"{name}: {r.status_code} {err}")
    # A body sent without Content-Length (chunked) is cut off by the same limit.
    r = http.post(CHAT, data=iter([b'{"messages": "', b"a" * (2 << 20), b'"}']))
    if r.status_code != 413 or not is_openai_error(r.json()):
        failures.append(f"chunked 2 MB body: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert health(server)["status"] == "ok"
    assert client.chat.completions.create(model=MODEL, messages=OK_MSG, max_tokens=3).usage.completion_tokens == 3


def test_unknown_fields_are_ignored_with_a_log_line(server, http):
    r = http.post(CHAT, json={"model": MODEL, "messages": OK_MSG, "max_tokens": 2, "frobnicate": 1, "user": "u1"})
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while "frobnicate" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in server.log().splitlines() if "frobnicate" in line)
    assert "ignoring unknown fields" in line and "user" not in line.split("frobnicate")[1]
