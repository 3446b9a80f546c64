"""Internal failures, in-process (aiohttp's test server around the real app and engine on a tiny model): a failing
model step answers 500 (or an in-stream error event) without internals in the body, frees the slots, and the server
keeps serving."""

import asyncio

import torch
from aiohttp.test_utils import TestClient, TestServer

from server_helpers import is_openai_error, parse_sse
from tinyserve.runtime.runner import ModelRunner, RunnerConfig
from tinyserve.server.app import ServeConfig, State, attach_engine, build_app
from tinyserve.generation.tokenizer import Tokenizer

SECRET = "secret internal detail 0xdeadbeef"
BODY = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}


def test_internal_failures_are_500s_without_internals(tiny_llama_dir):
    threads = torch.get_num_threads()
    runner = ModelRunner(tiny_llama_dir, RunnerConfig(device="cpu", num_slots=2, max_seq_len=256, batch_invariant=True, threads=1))
    tok = Tokenizer(tiny_llama_dir, runner.cfg.eos_token_ids)

    def broken(*args, **kwargs):
        raise RuntimeError(SECRET)

    async def scenario():
        state = State(ServeConfig())
        async with TestClient(TestServer(build_app(state))) as client:
            r = await client.post("/v1/chat/completions", json=BODY)
            assert r.status == 503 and is_openai_error(await r.json())  # no model yet
            engine = attach_engine(state, runner, tok, "tiny")
            try:
                good = await (await client.post("/v1/chat/completions", json=BODY)).json()

                runner.decode = broken  # every decode step fails from now on (prefill still works)
                r = await client.post("/v1/chat/completions", json=BODY)
                text = await r.text()
                assert r.status == 500 and is_openai_error(await r.json()) and SECRET not in text
                r = await client.post("/v1/chat/completions", json={**BODY, "stream": True})
                events = parse_sse(await r.text())
                assert r.status == 200 and events[-1] == "[DONE]"
                assert is_openai_error(events[-2]) and events[-2]["error"]["type"] == "server_error"
                assert SECRET not in str(events)
                assert runner.pool.num_free == 2

                del runner.decode  # the model works again: so does the server
                again = await (await client.post("/v1/chat/completions", json=BODY)).json()
                assert again["choices"] == good["choices"]

                engine.tok.chat_ids = broken  # a failure outside generation: the middleware's 500
                r = await client.post("/v1/chat/completions", json=BODY)
                assert r.status == 500 and is_openai_error(await r.json()) and SECRET not in await r.text()
                del engine.tok.chat_ids
            finally:
                await asyncio.to_thread(engine.stop)

    try:
        asyncio.run(scenario())
    finally:
        torch.set_num_threads(threads)


def test_a_model_that_fails_to_load_ends_serve_with_one_line(tiny_llama_dir, tmp_path):
    """The model loads in a thread after the port opens; its error reaches the event loop and serve exits 2 with the
    message (it used to hang: the callback referenced the exception after its except block had unset it)."""
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder)
    proc = subprocess.run([sys.executable, "-m", "tinyserve", "serve", "--model", str(folder), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "tinyserve: error: no .safetensors files in" in proc.stderr and "Traceback" not in proc.stderr
