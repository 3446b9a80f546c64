"""The real default model (SmolLM2-135M-Instruct, the default INT4 recipe, as `serve` loads it when given no --model) through
a real server: a factual answer, keep-alive pings while a long prompt is prefilled, and concurrent greedy requests
that match the same requests run one at a time."""

import asyncio

import openai
import pytest
import requests
from transformers import AutoTokenizer

from server_helpers import openai_client, parse_sse, running_server


@pytest.fixture(scope="module")
def awq_default():
    from tinyserve_quantize.default_model import ensure_quantized_default

    return ensure_quantized_default()


@pytest.fixture(scope="module")
def server(awq_default, tmp_path_factory):
    # No --model: the server resolves the same cached default as `chat` (already built by the fixture above).
    with running_server(["--num-slots", "4", "--ping-interval", "0.1", "--prefill-chunk", "256"],
                        tmp_path_factory.mktemp("server-real") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def test_default_model_answers(client, awq_default):
    (model,) = client.models.list().data
    assert model.id == awq_default.name
    r = client.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=120, temperature=0)
    assert "Paris" in r.choices[0].message.content
    # The model ends its answer itself (EOS) before max_tokens (recipe 4's default needs more than 30 tokens here).
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 120


def test_pings_while_a_long_prompt_is_prefilled(server, awq_default):
    from tinyserve_quantize.text_data import eval_text

    tok = AutoTokenizer.from_pretrained(awq_default)
    words = eval_text().split()
    text = " ".join(words[:1200])  # ~1,600 tokens: several prefill chunks of 256
    messages = [{"role": "user", "content": text + "\n\nSummarize the passage above in one sentence."}]
    r = requests.post(server.url + "/v1/chat/completions", timeout=300, json={
        "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    events = parse_sse(r.text)
    first_data = next(i for i, e in enumerate(events) if isinstance(e, dict))
    assert ("comment", "ping") in events[:first_data], "no ': ping' before the first chunk of a long prefill"
    usage = [e for e in events if isinstance(e, dict) and e.get("usage")][-1]["usage"]
    expected = len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert usage["prompt_tokens"] == expected > 1000
    assert events[-1] == "[DONE]"


def test_concurrent_greedy_requests_equal_sequential(server, client):
    prompts = ["Write a haiku about rain.", "List three uses of copper.", "Explain what a verb is.", "Describe a cat."]
    kwargs = dict(model=client.models.list().data[0].id, max_tokens=32, temperature=0)
    sequential = [client.chat.completions.create(messages=[{"role": "user", "content": p}], **kwargs).choices[0].message.content
                  for p in prompts]

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300) as ac:
            rs = await asyncio.gather(*(ac.chat.completions.create(messages=[{"role": "user", "content": p}], **kwargs) for p in prompts))
            return [r.choices[0].message.content for r in rs]

    assert asyncio.run(all_at_once()) == sequential
