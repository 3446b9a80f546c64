"""The Responses API's wire format (POST /v1/responses): the request into a chat `protocol.Request`, and the response
object and stream events out. Nothing here touches the model; the server runs a response like a chat completion.

Stateless: nothing is stored, so `previous_response_id` (and `conversation`, `background`) are refused with a 400
and every response says "store": false. Input items: messages (string content or input_text / output_text parts),
function_call (an earlier call of the model) and function_call_output (its result).

A stream is the event sequence OpenAI sends: response.created, response.in_progress, then per output item
response.output_item.added, (text) response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done, (call) response.function_call_arguments.delta, response.function_call_arguments.done, then
response.output_item.done; last response.completed (response.incomplete when max_output_tokens cut it short).
"""

import json
import uuid

from tinyserve.server import protocol as P
from tinyserve.server.protocol import APIError

_FIELDS = {
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text", "tools", "tool_choice",
    "parallel_tool_calls", "stream", "store", "metadata", "user", "truncation", "seed", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "safety_identifier", "prompt_cache_key", "service_tier",
    "include", "stream_options",
}
_REFUSED = {
    "previous_response_id": "this server is stateless: it stores no responses; send the whole conversation in input",
    "conversation": "this server is stateless: it stores no conversations; send the whole conversation in input",
    "background": "background responses are not supported",
    "prompt": "stored prompts are not supported",
    "reasoning": "reasoning options are not supported",
    "max_tool_calls": "max_tool_calls is not supported",
    "top_logprobs": "logprobs are not supported on /v1/responses; use /v1/chat/completions",
}
_TEXT_PARTS = ("input_text", "output_text", "text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise P._type_error(param, "a string or an array of content parts", content)
    out = []
    for j, part in enumerate(content):
        q = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise P._type_error(q, "an object", part)
        if part.get("type") not in _TEXT_PARTS:
            raise APIError(400, f"{q}.type: only text parts are supported, got {part.get('type')!r}", param=f"{q}.type",
                           code="unsupported_parameter")
        if not isinstance(part.get("text"), str):
            raise P._type_error(f"{q}.text", "a string", part.get("text"))
        out.append(part["text"])
    return "".join(out)


def _messages(body: dict) -> list[dict]:
    """instructions + input -> chat messages in the shape protocol._messages makes."""
    out = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise P._type_error("instructions", "a string", instructions)
        out.append({"role": "system", "content": instructions})
    items = body.get("input")
    if items is None:
        raise APIError(400, "input is required", param="input", code="missing_required_parameter")
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise P._bad("input", "must be a string or a non-empty array of items") if isinstance(items, list) else \
            P._type_error("input", "a string or an array of items", items)
    for i, item in enumerate(items):
        q = f"input[{i}]"
        if not isinstance(item, dict):
            raise P._type_error(q, "an object", item)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise P._bad(f"{q}.role", f"must be user, assistant, system or developer, got {role!r}")
            out.append({"role": "system" if role == "developer" else role, "content": _text(item.get("content"), f"{q}.content")})
        elif kind == "function_call":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise P._type_error(f"{q}.call_id", "a non-empty string", call_id)
            calls = P.tool_calls_history([{"id": call_id, "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments")}}], q)
            if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                out[-1]["tool_calls"] += calls  # parallel calls of one turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise P._type_error(f"{q}.call_id", "a non-empty string", call_id)
            out.append({"role": "tool", "tool_call_id": call_id, "content": _text(item.get("output"), f"{q}.output")})
        else:
            raise APIError(400, f"{q}.type: unsupported input item {kind!r} (supported: message, function_call, "
                                "function_call_output)", param=f"{q}.type", code="unsupported_parameter")
    return out


def parse(body: dict) -> P.Request:
    for name, why in _REFUSED.items():
        if body.get(name) is not None:
            raise APIError(400, f"{name}: {why}", param=name, code="unsupported_parameter")
    ignored = sorted(k for k in body if k not in _FIELDS)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise P._type_error("text", "an object", text)
    tools = P.tools(body.get("tools"), flat=True)
    stream = P._bool(body, "stream", False)
    return P.Request(
        kind="chat", model=P._model(body), messages=_messages(body), prompts=[],
        max_tokens=P._int(body, "max_output_tokens", 1, P.MAX_INT, None), max_tokens_param="max_output_tokens", n=1,
        stream=stream, include_usage=False, stop=[], logprobs=False, top_logprobs=0, sampling=P._sampling(body),
        ignored=ignored, response_format=P.response_format((text or {}).get("format"), "text.format"), tools=tools,
        tool_choice=P.tool_choice(body.get("tool_choice"), tools, flat=True),
        parallel_tool_calls=P._bool(body, "parallel_tool_calls", True), input_param="input",
    )


class Response:
    """One response: its output items as they are made, the object, and the stream's events."""

    def __init__(self, req: P.Request, body: dict, model: str, prompt_tokens: int):
        self.req, self.body, self.model = req, body, model
        self.id, self.created = new_id("resp"), P.now()
        self.prompt_tokens, self.output_tokens, self.cached_tokens = prompt_tokens, 0, 0
        self.items: list[dict] = []
        self.message: dict | None = None  # the output_text message item, once it has text
        self.seq = 0
        self.status, self.incomplete = "in_progress", None

    def object(self) -> dict:
        text_format = self.body.get("text", {}).get("format") if isinstance(self.body.get("text"), dict) else None
        done = self.status != "in_progress"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": self.status, "model": self.model,
            "output": self.items if done else [], "error": None,
            "incomplete_details": {"reason": self.incomplete} if self.incomplete else None,
            "instructions": self.body.get("instructions"), "max_output_tokens": self.req.max_tokens,
            "temperature": self.req.sampling.temperature, "top_p": self.req.sampling.top_p,
            "parallel_tool_calls": self.req.parallel_tool_calls, "tool_choice": _choice_wire(self.req.tool_choice),
            "tools": [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                       "strict": t.strict} for t in self.req.tools],
            "text": {"format": text_format or {"type": "text"}}, "store": False, "previous_response_id": None,
            "metadata": self.body.get("metadata") or {}, "truncation": "disabled",
            "usage": self.usage() if done else None,
        }

    def usage(self) -> dict:
        return {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + self.output_tokens}

    def event(self, kind: str, **fields) -> bytes:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\n".encode() + P.sse(obj)

    # ---- building the output (streamed or not) ----------------------------------------------------------------

    def start(self) -> list[bytes]:
        return [self.event("response.created", response=self.object()), self.event("response.in_progress", response=self.object())]

    def text(self, delta: str) -> list[bytes]:
        events = []
        if self.message is None:
            self.message = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant", "content": []}
            self.items.append(self.message)
            events.append(self.event("response.output_item.added", output_index=len(self.items) - 1, item={**self.message}))
            events.append(self.event("response.content_part.added", item_id=self.message["id"], output_index=len(self.items) - 1,
                                     content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
            self.message["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self.message["content"][0]["text"] += delta
        events.append(self.event("response.output_text.delta", item_id=self.message["id"], output_index=self._index(self.message),
                                 content_index=0, delta=delta, logprobs=[]))
        return events

    def _close_message(self) -> list[bytes]:
        m = self.message
        if m is None or m["status"] != "in_progress":
            return []
        m["status"] = "completed" if self.incomplete is None else "incomplete"
        index, part = self._index(m), m["content"][0]
        return [self.event("response.output_text.done", item_id=m["id"], output_index=index, content_index=0, text=part["text"], logprobs=[]),
                self.event("response.content_part.done", item_id=m["id"], output_index=index, content_index=0,
                           part={"type": "output_text", "text": part["text"], "annotations": []}),
                self.event("response.output_item.done", output_index=index, item=m)]

    def call(self, call) -> list[bytes]:
        """A tool call (tools.ToolCall), whole: its item added, its arguments as one delta, done."""
        events = self._close_message()
        item = {"type": "function_call", "id": new_id("fc"), "call_id": call.id, "name": call.name, "arguments": "",
                "status": "in_progress"}
        self.items.append(item)
        index = len(self.items) - 1
        events.append(self.event("response.output_item.added", output_index=index, item={**item}))
        events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=call.arguments))
        item.update(arguments=call.arguments, status="completed")
        events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=call.name, arguments=call.arguments))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def finish(self, length: bool) -> list[bytes]:
        """The end: length (max_output_tokens reached) makes the response incomplete."""
        if length:
            self.incomplete = "max_output_tokens"
        events = self._close_message()
        self.status = "incomplete" if length else "completed"
        events.append(self.event("response.incomplete" if length else "response.completed", response=self.object()))
        return events

    def _index(self, item: dict) -> int:
        return next(i for i, it in enumerate(self.items) if it is item)


def _choice_wire(choice: P.ToolChoice):
    return {"type": "function", "name": choice.name} if choice.mode == "function" else choice.mode


def error_event(seq: int, e: APIError) -> bytes:
    return b"event: error\n" + P.sse({"type": "error", "sequence_number": seq, "code": e.code, "message": e.message, "param": e.param})


def dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)
