"""The OpenAI-compatible HTTP server (aiohttp): `python -m tinyserve serve`.

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, GET /v1/models, GET /health (503 until the model is
loaded and while shutting down), GET /metrics (Prometheus), GET / (the chat page, tinyserve/server/web/).

The HTTP side only validates (tinyserve.server.protocol), tokenizes, submits sequences to the engine and writes what comes
back; model compute runs in the engine's worker thread. Handlers run with aiohttp's handler cancellation, so a client
that goes away cancels its handler, whose `finally` aborts its sequences (their slots are free at the next step).

Hardening: bodies over --max-body-bytes get 413; every error (including 404/405 and internal failures) has OpenAI's
shape and never a stack trace; the optional API key guards /v1/* and /metrics with a constant-time compare; CORS
only for the origins given; SIGTERM stops accepting connections, lets running requests finish for
--shutdown-timeout seconds, cancels the rest and exits 0.
"""

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web
from jinja2 import TemplateError

from tinyserve.server import protocol as P
from tinyserve.server import responses as R
from tinyserve.server.engine import Engine, RequestStream
from tinyserve.server.metrics import Metrics
from tinyserve.server.protocol import APIError
from tinyserve.generation import tools as tools_lib
from tinyserve.generation.grammar import GrammarError
from tinyserve.generation.scheduler import FinishReason, Output, QueueFull, SchedulerConfig, SeqSpec

log = logging.getLogger("tinyserve.server.app")
WEB_DIR = Path(__file__).parent / "web"
EXIT_USAGE = 2


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the model folder's name
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()  # "*" allows any origin
    max_body_bytes: int = 4 << 20
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    ping_interval: float = 5.0  # seconds of silence on a stream (a long prefill, a queue) before a ": ping" comment
    shutdown_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM
    retry_after: int = 1  # seconds, in the Retry-After header of 429 answers

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if self.ping_interval <= 0 or self.shutdown_timeout < 0:
            raise ValueError("--ping-interval must be positive and --shutdown-timeout not negative")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key must not be empty")


class State:
    """What the handlers share: the config, the engine once the model is loaded, the metrics."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.model_name: str | None = None
        self.created = P.now()
        self.draining = False


STATE = web.AppKey("state", State)


# ---- middlewares ----------------------------------------------------------------------------------------------


def _error_response(e: APIError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every error leaves as OpenAI's {"error": {...}}; internal failures are logged, never shown."""
    state = request.app[STATE]
    try:
        resp = await handler(request)
    except APIError as e:
        resp = _error_response(e)
    except web.HTTPRequestEntityTooLarge:
        limit = state.config.max_body_bytes
        resp = _error_response(APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        resp = _error_response(APIError(e.status, e.reason or "error", code=e.reason.lower().replace(" ", "_") if e.reason else None))
        if e.status == 405 and "Allow" in e.headers:
            resp.headers["Allow"] = e.headers["Allow"]
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        resp = _error_response(APIError(500, "internal server error", code="internal_error"))
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    state.metrics.http.labels(endpoint=route, status=str(resp.status)).inc()
    return resp


def _auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.method != "OPTIONS" and (request.path.startswith("/v1/") or request.path == "/metrics"):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", code="invalid_api_key")
        return await handler(request)

    return auth


def _cors_middleware(origins: tuple[str, ...]):
    any_origin = "*" in origins

    @web.middleware
    async def cors_preflight(request: web.Request, handler):
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
            if not (any_origin or origin in origins):
                raise APIError(403, f"origin {origin} is not allowed", code="cors_origin_not_allowed")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": "*" if any_origin else origin,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "Authorization, Content-Type"),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        return await handler(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and (any_origin or origin in origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if any_origin else origin
            response.headers["Vary"] = "Origin"

    return cors_preflight, add_headers


# ---- small endpoints ------------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    e = state.engine
    if state.draining:
        return web.json_response({"status": "shutting_down"}, status=503)
    if e is None:
        return web.json_response({"status": "loading"}, status=503)
    s = e.scheduler
    return web.json_response({"status": "ok", "model": state.model_name, "slots": e.runner.num_slots,
                              "slots_free": e.runner.pool.num_free, "running": s.num_running, "waiting": s.num_waiting})


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    engine = _engine(state)
    return web.json_response(P.model_list(state.model_name, state.created, engine.max_seq_len))


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def _engine(state: State) -> Engine:
    if state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if state.engine is None:
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading", headers={"Retry-After": "5"})
    return state.engine


# ---- completions ----------------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _read_json(request: web.Request, limit: int) -> dict:
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
    return P.parse_body(await request.read())


def _prompt_ids(engine: Engine, req: P.Request) -> list[list[int]]:
    tok = engine.tok
    if req.kind == "chat":
        if not tok.has_chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        shown = [t.template_form() for t in req.tools] if req.tool_choice.mode != "none" else []
        try:
            return [tools_lib.chat_ids(tok, req.messages, shown)]
        except (TemplateError, ValueError) as e:  # a template may refuse a conversation (e.g. roles not alternating)
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages", code="invalid_value") from None
    vocab = engine.runner.cfg.vocab_size
    out = []
    for i, p in enumerate(req.prompts):
        if isinstance(p, str):
            ids = tok.encode(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
            out.append(ids)
        else:
            if max(p) >= vocab:
                raise APIError(400, f"prompt[{i}]: token ids must be below the vocabulary size {vocab}", param="prompt", code="invalid_value")
            out.append(p)
    return out


def _max_tokens(req: P.Request, prompt_len: int, context: int) -> int:
    prompt_param = req.input_param if req.kind == "chat" else "prompt"
    if prompt_len >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your {prompt_param} "
                            f"resulted in {prompt_len} tokens. Please reduce the length of the {prompt_param}.",
                       param=prompt_param, code="context_length_exceeded")
    if req.max_tokens is None:
        return context - prompt_len
    if prompt_len + req.max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_len + req.max_tokens} tokens ({prompt_len} in the {prompt_param}, {req.max_tokens} "
                            f"in the completion). Please reduce the length of the {prompt_param} or {req.max_tokens_param}.",
                       param=req.max_tokens_param, code="context_length_exceeded")
    return req.max_tokens


async def _grammar(engine: Engine, req: P.Request) -> str | None:
    """The grammar a chat request's output must follow, checked by the engine (a 400 naming the field if it cannot
    be enforced), or None: tool_choice required or a named function forces tool calls; response_format forces JSON,
    or with tool_choice auto, JSON or tool calls."""
    choice, rf = req.tool_choice, req.response_format
    forced = choice.mode in ("required", "function")
    if not forced and rf is None:
        return None
    tools = []
    if forced or choice.mode == "auto":
        tools = [{"name": t.name, "parameters": t.parameters, "strict": t.strict} for t in req.tools
                 if choice.mode != "function" or t.name == choice.name]
    schema = None if forced else (rf.schema if rf.kind == "json_schema" else {"type": "object"})
    strict = bool(rf and rf.strict)
    parallel = req.parallel_tool_calls and choice.mode != "function"
    grammars = engine.scheduler.grammars
    try:  # in a thread: the first grammar builds the tokenizer's trie (0.4-1.5 s), a large schema takes a while
        return await asyncio.to_thread(grammars.structured, schema, strict, tools, parallel, tools_lib.OPEN_TAG, tools_lib.CLOSE_TAG,
                                       rf.param if rf else "response_format", "tools")
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None


def _specs(req: P.Request, prompts: list[list[int]], context: int, grammar: str | None = None) -> list[SeqSpec]:
    from tinyserve.generation.sampling import SamplingError, SamplingParams

    s = req.sampling
    specs = []
    for ids in prompts:
        max_tokens = _max_tokens(req, len(ids), context)
        for j in range(req.n):
            try:
                params = SamplingParams(
                    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                    repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
                    frequency_penalty=s.frequency_penalty, seed=None if s.seed is None else s.seed + j,
                    logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                )
            except SamplingError as e:
                raise APIError(400, str(e), code="invalid_value") from None
            specs.append(SeqSpec(tuple(ids), max_tokens, params, tuple(req.stop), grammar=grammar))
    return specs


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _read_json(request, state.config.max_body_bytes)
    req = P.parse_chat(body) if kind == "chat" else P.parse_completion(body, vocab_size=2**31)
    engine, prompts, stream = await _submit(request, state, req)
    reply = Reply(req, state.model_name, engine, [len(p) for p in prompts])
    try:
        if req.stream:
            return await _stream(request, state, stream, reply)
        return await _collect(stream, reply)
    finally:
        stream.cancel()


async def _submit(request: web.Request, state: State, req: P.Request) -> tuple[Engine, list[list[int]], RequestStream]:
    """Check a parsed request's model, tokenize it, build its grammar, queue its sequences -> (the engine, prompt
    ids, their stream)."""
    if req.ignored:
        log.info("ignoring unknown fields in %s: %s", request.path, ", ".join(req.ignored))
    engine = _engine(state)
    if req.model is not None and req.model != state.model_name:
        raise APIError(404, f"The model '{req.model}' does not exist (this server runs '{state.model_name}')",
                       param="model", code="model_not_found")
    prompts = _prompt_ids(engine, req)
    grammar = await _grammar(engine, req) if req.kind == "chat" else None
    specs = _specs(req, prompts, engine.max_seq_len, grammar)
    if len(specs) > state.config.scheduler.max_waiting:
        raise APIError(400, f"this request asks for {len(specs)} sequences; this server queues at most "
                            f"{state.config.scheduler.max_waiting} (--max-waiting)", param="n", code="invalid_value")
    try:
        return engine, prompts, engine.submit(specs)
    except QueueFull:
        state.metrics.rejected.inc()
        raise APIError(429, "the server is at capacity (waiting queue full); retry shortly", code="queue_full",
                       headers={"Retry-After": str(state.config.retry_after)}) from None


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses: a chat completion in the Responses API's shape (tinyserve/server/responses.py)."""
    state = request.app[STATE]
    body = await _read_json(request, state.config.max_body_bytes)
    req = R.parse(body)
    engine, prompts, stream = await _submit(request, state, req)
    reply = Reply(req, state.model_name, engine, [len(p) for p in prompts])
    out = R.Response(req, body, state.model_name, reply.prompt_tokens)
    try:
        if req.stream:
            return await _stream_response(request, state, stream, reply, out)
        async for i, o in stream:
            err = _failure(o)
            if err is not None:
                raise err
            reply.add(i, o)
        content, calls = reply.split(0, reply.text[0], final=True)
        if content:
            out.text(content)
        for call in calls:
            out.call(call)
        out.output_tokens, out.cached_tokens = reply.completion_tokens, reply.cached_tokens
        out.finish(reply.finish[0] is FinishReason.LENGTH)
        return web.json_response(out.object(), dumps=R.dumps)
    finally:
        stream.cancel()


async def _stream_response(request: web.Request, state: State, stream: RequestStream, reply: "Reply",
                           out: R.Response) -> web.StreamResponse:
    resp = await _event_stream(request)
    try:
        await resp.write(b"".join(out.start()))
        async for i, o in _outputs(stream, resp, state.config.ping_interval):
            err = _failure(o)
            if err is not None:
                await resp.write(R.error_event(out.seq, err))
                return resp
            reply.add(i, o)
            content, calls = reply.split(i, o.text, final=o.finish_reason is not None)
            events = out.text(content) if content else []
            for call in calls:
                events += out.call(call)
            if o.finish_reason is not None:
                out.output_tokens, out.cached_tokens = reply.completion_tokens, reply.cached_tokens
                events += out.finish(o.finish_reason is FinishReason.LENGTH)
            if events:
                await resp.write(b"".join(events))
        await resp.write_eof()
    except (ConnectionError, RuntimeError) as e:  # the client went away mid-stream
        log.info("stream %s ended early: %s", out.id, e)
    return resp


class Reply:
    """Accumulates one request's choices and formats them (whole response, or chunks)."""

    def __init__(self, req: P.Request, model: str, engine: Engine, prompt_lens: list[int]):
        self.req, self.model, self.engine = req, model, engine
        self.id, self.created = P.new_id(req.kind), P.now()
        self.prompt_tokens = sum(prompt_lens)
        n = len(prompt_lens) * req.n
        self.text = [""] * n
        self.logprobs: list[list[P.TokenLogprob]] = [[] for _ in range(n)]
        self.sent_logprobs = [0] * n  # streaming: entries of self.logprobs[i] already sent
        self.sent_chars = [0] * n  # streaming completions: text_offset of the next chunk
        self.finish: list[FinishReason | None] = [None] * n
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens the prefix cache served, all choices
        calls = req.kind == "chat" and req.tools and req.tool_choice.mode != "none"
        names = {t.name for t in req.tools}
        self.parsers = [tools_lib.CallParser(names) for _ in range(n)] if calls else None  # per choice
        self.content = [""] * n  # the text, tool calls taken out (when parsers)

    def add(self, i: int, out: Output) -> None:
        self.text[i] += out.text
        self.cached_tokens += out.cached_tokens
        if out.token is not None:
            self.completion_tokens += 1
            if self.req.logprobs:
                self.logprobs[i].append(self._logprob(out))
        self.finish[i] = out.finish_reason

    def _logprob(self, out: Output) -> P.TokenLogprob:
        pieces, t = self.engine.pieces, out.token
        top = [(*pieces(tid), lp) for tid, lp in (t.top_logprobs or [])]
        return P.TokenLogprob(*pieces(t.token), t.logprob, top)

    def usage(self) -> dict:
        return P.usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def _lp(self, i: int, entries: list[P.TokenLogprob], text_offset: int) -> dict | None:
        if not self.req.logprobs:
            return None
        if self.req.kind == "chat":
            return P.chat_logprobs(entries)
        return P.completion_logprobs(entries, text_offset, with_top=self.req.top_logprobs > 0)

    def split(self, i: int, text: str, final: bool) -> tuple[str, list[tools_lib.ToolCall]]:
        """Choice i's new text -> (content, completed tool calls); final: the choice has ended."""
        if self.parsers is None:
            return text, []
        content, calls = self.parsers[i].push(text)
        if final:
            rest, more = self.parsers[i].flush()
            content, calls = content + rest, calls + more
        self.content[i] += content
        return content, calls

    def finish_reason(self, i: int):
        """"tool_calls" when choice i stopped after calling tools, else its finish reason."""
        if self.parsers is not None and self.parsers[i].calls and self.finish[i] is FinishReason.STOP:
            return "tool_calls"
        return self.finish[i]

    def whole(self) -> dict:
        n = len(self.text)
        if self.req.kind == "chat":
            choices = []
            for i in range(n):
                content, calls = self.split(i, self.text[i], final=True)
                choices.append(P.chat_choice(i, content, self.finish_reason(i), self._lp(i, self.logprobs[i], 0),
                                             [c.wire() for c in calls]))
            return P.chat_completion(self.id, self.created, self.model, choices, self.usage())
        choices = [P.text_choice(i, self.text[i], self.finish[i], self._lp(i, self.logprobs[i], 0)) for i in range(n)]
        return P.text_completion(self.id, self.created, self.model, choices, True, self.usage())

    def chunk(self, choices: list[dict]) -> bytes:
        if self.req.kind == "chat":
            return P.sse(P.chat_chunk(self.id, self.created, self.model, choices, self.req.include_usage))
        return P.sse(P.text_completion(self.id, self.created, self.model, choices, self.req.include_usage, None))

    def delta_chunks(self, i: int, out: Output, first: bool) -> list[bytes]:
        """SSE events for one output of choice i (the role chunk first for a chat choice's first output)."""
        chunks = []
        pending = self.logprobs[i][self.sent_logprobs[i]:]
        has_logprobs = self.req.logprobs and pending
        chat = self.req.kind == "chat"
        if chat and first:
            chunks.append(self.chunk([P.chat_delta(i, {"role": "assistant", "content": ""})]))
        text, calls = self.split(i, out.text, final=out.finish_reason is not None) if chat else (out.text, [])
        if text:
            # Logprobs travel with text; tokens that produced no text yet (held back) are sent with the next text.
            lp = self._lp(i, pending, self.sent_chars[i]) if has_logprobs else None
            self.sent_logprobs[i] = len(self.logprobs[i])
            if chat:
                chunks.append(self.chunk([P.chat_delta(i, {"content": text}, None, lp)]))
            else:
                chunks.append(self.chunk([P.text_choice(i, text, None, lp)]))
            self.sent_chars[i] += len(text)
        first_call = len(self.parsers[i].calls) - len(calls) if calls else 0
        for k, call in enumerate(calls, first_call):  # a call goes out whole, as one delta: id, name and arguments
            chunks.append(self.chunk([P.chat_delta(i, {"tool_calls": [call.wire(k)]})]))
        if out.finish_reason is not None:
            rest = self.logprobs[i][self.sent_logprobs[i]:]
            lp = self._lp(i, rest, self.sent_chars[i]) if self.req.logprobs and rest else None
            self.sent_logprobs[i] = len(self.logprobs[i])
            if chat:
                chunks.append(self.chunk([P.chat_delta(i, {}, self.finish_reason(i), lp)]))
            else:
                chunks.append(self.chunk([P.text_choice(i, "", out.finish_reason, lp)]))
        return chunks

    def usage_chunk(self) -> bytes:
        if self.req.kind == "chat":
            return P.sse(P.chat_chunk(self.id, self.created, self.model, [], True, self.usage()))
        return P.sse(P.text_completion(self.id, self.created, self.model, [], True, self.usage()))


def _failure(out: Output) -> APIError | None:
    """An output that ends a sequence abnormally -> the error to report."""
    if out.finish_reason is FinishReason.ERROR:
        log.error("generation failed: %s", out.error)
        return APIError(500, "internal error during generation", code="internal_error")
    if out.finish_reason is FinishReason.SHUTDOWN:
        return APIError(503, "the server is shutting down", code="shutting_down")
    if out.finish_reason is FinishReason.CANCELLED:
        return APIError(503, "the request was cancelled", code="cancelled")
    return None


async def _collect(stream: RequestStream, reply: Reply) -> web.Response:
    async for i, out in stream:
        err = _failure(out)
        if err is not None:
            raise err
        reply.add(i, out)
    return web.json_response(reply.whole(), dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _event_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    return resp


async def _outputs(stream: RequestStream, resp: web.StreamResponse, ping_interval: float):
    """A request's outputs as (choice index, Output), with a ": ping" comment written after each ping_interval of
    silence (keeps proxies and clients from timing out during a long prefill or a wait in the queue)."""
    while True:
        try:
            item = await stream.next(ping_interval)
        except StopAsyncIteration:
            return
        if item is None:
            await resp.write(P.SSE_PING)
        else:
            yield item


async def _stream(request: web.Request, state: State, stream: RequestStream, reply: Reply) -> web.StreamResponse:
    resp = await _event_stream(request)
    started = [False] * len(reply.text)
    try:
        async for i, out in _outputs(stream, resp, state.config.ping_interval):
            err = _failure(out)
            if err is not None:
                await resp.write(P.sse(err.body()) + P.SSE_DONE)
                return resp
            reply.add(i, out)
            events = reply.delta_chunks(i, out, not started[i])
            started[i] = True
            await resp.write(b"".join(events))
        if reply.req.include_usage:
            await resp.write(reply.usage_chunk())
        await resp.write(P.SSE_DONE)
        await resp.write_eof()
    except (ConnectionError, RuntimeError) as e:  # the client went away mid-stream (RuntimeError: transport closed)
        log.info("stream %s ended early: %s", reply.id, e)
    return resp


# ---- app and process ------------------------------------------------------------------------------------------


def build_app(state: State) -> web.Application:
    cfg = state.config
    middlewares = [errors_middleware]
    cors_hook = None
    if cfg.cors_origins:
        preflight, cors_hook = _cors_middleware(cfg.cors_origins)
        middlewares.append(preflight)
    if cfg.api_key:
        middlewares.append(_auth_middleware(cfg.api_key))
    # aiohttp's own limit is a backstop (it also covers bodies sent without Content-Length).
    app = web.Application(middlewares=middlewares, client_max_size=cfg.max_body_bytes)
    app[STATE] = state
    if cors_hook is not None:
        app.on_response_prepare.append(cors_hook)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.router.add_static("/static", WEB_DIR, append_version=False)
    return app


def attach_engine(state: State, runner, tokenizer, name: str | None = None, draft=None) -> Engine:
    """Start an engine on a loaded model (and speculation's draft model, if any) and make the server ready (in the
    running event loop)."""
    sched = state.config.scheduler
    if sched.speculate and not runner.position_invariant:
        log.warning("--speculate needs the cpu-native backend (position-invariant steps); the %s backend decodes without it",
                    runner.backend.name)
        sched = replace(sched, speculate=0)
    engine = Engine(runner, tokenizer, sched, state.metrics, draft)
    engine.start()
    state.model_name = name or state.config.served_model_name or Path(runner.model_dir).name
    state.engine = engine
    return engine


def _load_in_thread(load: Callable[[], tuple]) -> asyncio.Future:
    """Run `load` in a daemon thread (a SIGTERM during a long load must not wait for it)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def run():
        try:
            result = load()
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            loop.call_soon_threadsafe(lambda e=e: fut.done() or fut.set_exception(e))  # bound now: `e` is unset after the block
        else:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

    threading.Thread(target=run, name="tinyserve-load", daemon=True).start()
    return fut


async def serve(config: ServeConfig, load: Callable[[], tuple], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Listen at once (GET /health answers 503 while loading), load the model with `load() -> (runner, tokenizer)` or
    `(runner, tokenizer, draft runner or None)`,
    serve until SIGTERM or SIGINT, then shut down gracefully. Returns the exit status."""
    state = State(config)
    app = build_app(state)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0,
                           access_log_format='%a "%r" %s %b %Tfs')
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"tinyserve: error: cannot listen on {config.host}:{config.port}: {e.strerror or e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    log.info("listening on http://%s:%d (loading the model; /health answers 503 until it is ready)", config.host, config.port)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = _load_in_thread(load)
    stopper = asyncio.ensure_future(stop.wait())
    t0 = time.perf_counter()
    await asyncio.wait([loading, stopper], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if loading.done():
        try:
            model_runner, tokenizer, *draft = loading.result()
        except user_errors as e:
            print(f"tinyserve: error: {e}", file=sys.stderr, flush=True)
            status = EXIT_USAGE
        except Exception:
            log.exception("loading the model failed")
            status = 1
        else:
            attach_engine(state, model_runner, tokenizer, draft=draft[0] if draft else None)
            log.info("model %s ready in %.1f s: %d slots x %d tokens; serving on http://%s:%d", state.model_name,
                     time.perf_counter() - t0, model_runner.num_slots, model_runner.max_seq_len, config.host, config.port)
            await stopper
    stopper.cancel()
    await _shutdown(state, runner, site)
    return status


async def _shutdown(state: State, runner: web.AppRunner, site: web.TCPSite) -> None:
    """Stop accepting, let running requests finish for shutdown_timeout seconds, cancel the rest, stop the engine."""
    log.info("shutting down: no new connections; waiting up to %.0f s for running requests", state.config.shutdown_timeout)
    state.draining = True
    await site.stop()
    engine = state.engine
    if engine is not None:
        if not await engine.drain(state.config.shutdown_timeout):
            log.warning("cancelling the requests still running")
            engine.abort_all(FinishReason.SHUTDOWN)
            await engine.drain(5.0)
    await runner.cleanup()
    if engine is not None:
        await asyncio.to_thread(engine.stop)
    log.info("stopped")


def byte_size(text: str) -> int:
    """'1G', '512M', '64K' or a number of bytes -> bytes (an argparse type: a ValueError is a usage error)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = units.get(t[-1:], 1)
    number = float(t[:-1] if t[-1:] in units else t)
    if not 0 <= number < float("inf"):
        raise ValueError(f"not a size: {text}")
    return int(number * scale)


def add_args(p) -> None:
    """The serve subcommand's own flags (the runtime flags, --model included, come from tinyserve.cli.main)."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="the model id clients send and /v1/models lists (default: the folder name)")
    g.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/* and /metrics (default: $TINYSERVE_API_KEY if set)")
    g.add_argument("--cors-origin", action="append", default=[], help="allow browser requests from this origin (repeatable; * for any)")
    g.add_argument("--num-slots", type=int, default=16, help="concurrent sequences (KV cache slots, default 16)")
    g.add_argument("--max-waiting", type=int, default=64, help="sequences that may wait for a slot before requests get 429 (default 64)")
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step, so long prompts do not stall running streams")
    g.add_argument("--no-prefix-cache", action="store_true", help="prefill every prompt whole, even a prefix a KV slot already holds")
    g.add_argument("--prefix-cache-bytes", type=byte_size, default=1 << 30, metavar="SIZE",
                   help="host memory that keeps cached prefixes after their KV slots go to other prompts, e.g. 512M or 4G (binary: "
                        "G = 2^30 bytes) "
                        "(default 1G; 0: only what the slots hold)")
    g.add_argument("--speculate", type=int, default=4, metavar="K",
                   help="speculative decoding by prompt lookup: verify up to K proposed tokens per step (default 4, measured "
                        "best in BENCHMARKS.md; 0: off); the same tokens, faster where replies repeat the prompt (CPU, cpu-native)")
    g.add_argument("--speculate-max-batch", type=int, default=1, metavar="N", help="speculate only while at most N sequences decode (default 1)")
    g.add_argument("--draft-model", default=None, metavar="DIR",
                   help="a smaller model with the same tokenizer whose greedy continuation is proposed (default: prompt lookup)")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    g.add_argument("--ping-interval", type=float, default=5.0, help="seconds of silence before a ': ping' comment on a stream")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get to finish after SIGTERM")


def config_from_args(a) -> ServeConfig:
    return ServeConfig(
        host=a.host,
        port=a.port,
        served_model_name=a.served_model_name,
        api_key=a.api_key if a.api_key is not None else (os.environ.get("TINYSERVE_API_KEY") or None),
        cors_origins=tuple(a.cors_origin),
        max_body_bytes=a.max_body_bytes,
        scheduler=SchedulerConfig(max_waiting=a.max_waiting, prefill_chunk=a.prefill_chunk, prefix_cache=not a.no_prefix_cache,
                                  prefix_cache_bytes=a.prefix_cache_bytes,
                                  speculate=a.speculate, speculate_max_batch=a.speculate_max_batch),
        ping_interval=a.ping_interval,
        shutdown_timeout=a.shutdown_timeout,
    )


def main(config: ServeConfig, load: Callable[[], tuple], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(config, load, user_errors))
