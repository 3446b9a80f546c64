"""Prompt-lookup speculative decoding and the position-invariant prefix cache through a real server on the default
model (`serve --speculate 4`): a greedy editing reply equals plain decoding of the same prompt in-process (no
speculation), proposals were verified and kept (/metrics), and sending the conversation's next turn reuses the first
turn's prompt and reply from the cache, from host memory once other conversations have taken both KV slots."""

import pytest
import requests

from server_helpers import openai_client, running_server
from tinyserve.generation.sampling import SamplingParams
from tinyserve.generation.scheduler import Scheduler, SchedulerConfig, SeqSpec
from tinyserve.generation.tokenizer import Tokenizer
from tinyserve.runtime.runner import ModelRunner, RunnerConfig

PARAGRAPH = ("The old lighthouse keeper climbed the stairs every evening at six. He trimmed the wick, polished the lens "
             "and wrote the weather in a book that nobody read.")
MESSAGES = [{"role": "user", "content": "Repeat this paragraph word for word, but say 'she' instead of 'he':\n\n" + PARAGRAPH}]


@pytest.fixture(scope="module")
def awq_default():
    from tinyserve_quantize.default_model import ensure_quantized_default

    return ensure_quantized_default()


@pytest.fixture(scope="module")
def server(awq_default, tmp_path_factory):
    with running_server(["--num-slots", "2", "--speculate", "4", "--prefix-cache-bytes", "64M"], tmp_path_factory.mktemp("server-spec") / "server.log") as srv:
        yield srv


def metric(srv, name: str) -> float:
    for line in requests.get(srv.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_speculative_reply_equals_plain_decoding_and_the_next_turn_is_cached(server, awq_default):
    from tinyserve.runtime.backends import cpu_kernels_usable

    if not cpu_kernels_usable("auto"):
        pytest.skip("speculation and any-prefix reuse need the cpu-native backend (AVX512-BF16 and VNNI); this CPU's server runs eager")
    client = openai_client(server)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60, temperature=0)
    reply = r.choices[0].message.content
    assert metric(server, "tinyserve_spec_accepted_tokens_total") > 0
    assert metric(server, "tinyserve_spec_accepted_tokens_total") <= metric(server, "tinyserve_spec_draft_tokens_total")

    runner = ModelRunner(awq_default, RunnerConfig(device="cpu", num_slots=1, max_seq_len=2048, batch_invariant=True,
                                                   position_invariant=True, threads=1))
    tok = Tokenizer(awq_default, runner.cfg.eos_token_ids)
    sched = Scheduler(runner, tok, SchedulerConfig())
    sched.add([SeqSpec(tuple(tok.chat_ids(MESSAGES)), 60, SamplingParams(temperature=0))])
    text = ""
    while sched.has_work():
        text += "".join(o.text for o in sched.step())
    assert reply == text

    turn2 = MESSAGES + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Thanks. Now shorter."}]
    r2 = client.chat.completions.create(model=model, messages=turn2, max_tokens=8, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r.usage.prompt_tokens + r.usage.completion_tokens - 3  # all of turn 1 but its end-of-turn tokens

    for other in ["Name three rivers in Europe.", "Write a haiku about rain."]:  # take both slots, one after the other
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": other}], max_tokens=4, temperature=0)
    assert 0 < metric(server, "tinyserve_prefix_cache_host_bytes") <= 64 << 20
    r3 = client.chat.completions.create(model=model, messages=turn2, max_tokens=8, temperature=0)
    assert r3.usage.prompt_tokens_details.cached_tokens == r3.usage.prompt_tokens - 1  # copied back from host memory
    assert r3.choices[0].message.content == r2.choices[0].message.content
