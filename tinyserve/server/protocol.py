"""The OpenAI wire format: request validation into typed requests, and the response / chunk / error objects.

Nothing here touches the model. `parse_chat` and `parse_completion` take the decoded JSON body and either return a
typed request or raise `APIError` naming the offending parameter, with the status OpenAI would answer. Unknown fields
are returned in `ignored` (the server logs them); known OpenAI fields we cannot honour (`logit_bias`, `audio`, ...)
are refused with a 400 that names them, unless they hold their do-nothing default. Whether a schema can be enforced
is decided later, by the grammar engine (the server answers its GrammarError with a 400 naming the field).
"""

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scheduler imports torch; this module touches nothing of the model
    from tinyserve.generation.scheduler import FinishReason

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_TOP_LOGPROBS = 20
MAX_N = 8  # choices per request (OpenAI allows more; every choice holds a KV slot here)
MAX_PROMPTS = 16  # /v1/completions accepts a batch of prompts
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the legacy endpoint's documented default
MAX_SEED = 2**63 - 1
MAX_INT = 2**31 - 1  # bound for counts such as max_tokens: larger values are answered 400, not overflowed

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Known OpenAI fields that change the output in ways we do not implement. Each maps to a predicate that says whether
# the given value is harmless (the default), in which case it is accepted.
_UNSUPPORTED_COMMON = {
    "logit_bias": lambda v: v is None or v == {},
    "best_of": lambda v: v is None or v == 1,
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "echo": lambda v: v is None or v is False,
    "suffix": lambda v: v is None or v == "",
}
# Known fields that do not affect generation: accepted silently.
_ACCEPTED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}

_CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "stream", "stream_options",
    "logprobs", "top_logprobs", "n", "response_format", "tools", "tool_choice", "parallel_tool_calls",
}
# The legacy endpoint has no structured output or tools: those fields keep their do-nothing defaults there.
_COMPLETION_ONLY_DEFAULTS = {
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: True,
}
_COMPLETION_FIELDS = (_CHAT_FIELDS - {"messages", "max_completion_tokens", "top_logprobs"} - set(_COMPLETION_ONLY_DEFAULTS)) | {"prompt"}


class APIError(Exception):
    """An error answered to the client as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.TYPES.get(self.status, "invalid_request_error"), self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Sampling:
    """Per-request sampling settings, already validated. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1 on the wire): off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class ResponseFormat:
    """What the output must be: any JSON object, or JSON valid against a schema."""

    kind: str  # "json_object" | "json_schema"
    schema: dict | None = None
    strict: bool = False
    name: str | None = None
    param: str = "response_format"  # the field named in errors about it


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict | None  # a JSON Schema; None: any object
    strict: bool

    def template_form(self) -> dict:
        """As chat templates take tools (OpenAI's chat shape)."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters or {"type": "object", "properties": {}}}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required" | "function"
    name: str | None = None  # mode "function": the one function to call


@dataclass
class Request:
    """One validated chat or completion request. `prompts` holds one entry for chat (the messages) and one or more
    for /v1/completions (text or token ids)."""

    kind: str  # "chat" | "completion"
    model: str | None
    messages: list[dict] | None  # chat: [{"role", "content": str}], content parts already joined
    prompts: list[str | list[int]]  # completion: each a string or token ids
    max_tokens: int | None  # None: as many as fit in the context
    max_tokens_param: str  # the field the client used, named in context-length errors
    n: int
    stream: bool
    include_usage: bool
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    sampling: Sampling
    ignored: list[str] = field(default_factory=list)
    response_format: ResponseFormat | None = None
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True
    input_param: str = "messages"  # the field holding the conversation, named in context-length errors


# ---- body and field validation ----------------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict:
    """Bytes of a request body -> a JSON object; APIError 400 for anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    if not text.strip():
        raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        msg = "request body is nested too deeply" if isinstance(e, RecursionError) else f"request body is not valid JSON: {e}"
        raise APIError(400, msg, code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {_type_name(body)}", code="invalid_json")
    return body


def _type_name(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _bad(param: str, msg: str) -> APIError:
    return APIError(400, f"{param}: {msg}", param=param, code="invalid_value")


def _type_error(param: str, want: str, v) -> APIError:
    return APIError(400, f"{param} must be {want}, got {_type_name(v)}", param=param, code="invalid_type")


def _int(body: dict, name: str, lo: int, hi: int, default):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        # JSON has one number type: 16.0 is accepted as 16, 16.5 is not.
        if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:
            v = int(v)
        else:
            raise _type_error(name, "an integer", v)
    if not lo <= v <= hi:
        raise _bad(name, f"{v} is out of range (allowed: {lo} to {hi})")
    return v


def _float(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(name, "a number", v)
    v = float(v)
    if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
        bound = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise _bad(name, f"{v} is out of range (must be {bound} and at most {hi})")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(name, "a boolean", v)
    return v


def _check_fields(body: dict, known: set[str], unsupported: dict = _UNSUPPORTED_COMMON) -> list[str]:
    """Refuse supported-by-OpenAI-but-not-here fields that carry a real value; return the unknown field names."""
    for name, harmless in unsupported.items():
        if name in body and not harmless(body[name]):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    return sorted(k for k in body if k not in known and k not in _ACCEPTED and k not in unsupported)


def _model(body: dict) -> str | None:
    v = body.get("model")
    if v is not None and not isinstance(v, str):
        raise _type_error("model", "a string", v)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", v)
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
    if any(s == "" for s in stops):
        raise _bad("stop", "stop sequences must not be empty")
    return list(dict.fromkeys(stops))


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise _type_error("stream_options", "an object", opts)
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise _type_error("stream_options.include_usage", "a boolean", include)
    return stream, include


def _sampling(body: dict) -> Sampling:
    top_k = _int(body, "top_k", -1, MAX_INT, 0)
    return Sampling(
        temperature=_float(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_float(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        top_k=max(top_k, 0),
        min_p=_float(body, "min_p", 0.0, 1.0, 0.0),
        presence_penalty=_float(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_float(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=_float(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True),
        seed=_int(body, "seed", -MAX_SEED, MAX_SEED, None),
    )


def _content(content, param: str) -> str:
    """A message's content: a string, or an array of text parts (which the OpenAI clients also send)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            p = f"{param}[{j}]"
            if not isinstance(part, dict):
                raise _type_error(p, "an object", part)
            if part.get("type") != "text":
                raise APIError(400, f"{p}.type: only text content parts are supported, got {part.get('type')!r}",
                               param=f"{p}.type", code="unsupported_parameter")
            if not isinstance(part.get("text"), str):
                raise _type_error(f"{p}.text", "a string", part.get("text"))
            texts.append(part["text"])
        return "".join(texts)
    raise _type_error(param, "a string or an array of content parts", content)


def _messages(body: dict) -> list[dict]:
    """The conversation -> [{"role", "content": str}], an assistant's earlier calls as "tool_calls" (arguments
    decoded to objects, as chat templates take them) and a tool result's "tool_call_id"."""
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "messages is required", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list):
        raise _type_error("messages", "an array", msgs)
    if not msgs:
        raise _bad("messages", "messages must hold at least one message")
    out = []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(p, "an object", m)
        role = m.get("role")
        if not isinstance(role, str):
            raise _type_error(f"{p}.role", "a string", role)
        if role not in ROLES:
            code = "unsupported_parameter" if role == "function" else "invalid_value"
            raise APIError(400, f"{p}.role: unsupported role {role!r} (supported: {', '.join(ROLES)})",
                           param=f"{p}.role", code=code)
        for key in ("function_call", "audio"):
            if m.get(key):
                raise APIError(400, f"{p}.{key} is not supported by this server", param=f"{p}.{key}",
                               code="unsupported_parameter")
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise _bad(f"{p}.tool_calls", "only assistant messages carry tool_calls")
        if m.get("content") is None and not (role == "assistant" and calls):
            raise APIError(400, f"{p}.content is required", param=f"{p}.content", code="missing_required_parameter")
        # "developer" is OpenAI's newer name for the system role.
        msg = {"role": "system" if role == "developer" else role,
               "content": _content(m["content"], f"{p}.content") if m.get("content") is not None else ""}
        if calls:
            msg["tool_calls"] = tool_calls_history(calls, f"{p}.tool_calls")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise APIError(400, f"{p}.tool_call_id is required (a string) in a tool message", param=f"{p}.tool_call_id",
                               code="missing_required_parameter")
            msg["tool_call_id"] = call_id
        out.append(msg)
    return out


def tool_calls_history(calls, param: str) -> list[dict]:
    """An assistant's earlier tool calls (OpenAI's shape, arguments a JSON string) -> the chat-template shape."""
    if not isinstance(calls, list):
        raise _type_error(param, "an array", calls)
    out = []
    for j, c in enumerate(calls):
        q = f"{param}[{j}]"
        if not isinstance(c, dict):
            raise _type_error(q, "an object", c)
        if c.get("type", "function") != "function":
            raise APIError(400, f"{q}.type: only function tool calls are supported", param=f"{q}.type", code="unsupported_parameter")
        fn = c.get("function")
        if not isinstance(fn, dict):
            raise _type_error(f"{q}.function", "an object", fn)
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not name:
            raise _type_error(f"{q}.function.name", "a non-empty string", name)
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except (ValueError, RecursionError):
                raise _bad(f"{q}.function.arguments", "is not valid JSON") from None
        if not isinstance(args, dict):
            raise _type_error(f"{q}.function.arguments", "a JSON object (as a string)", args)
        call_id = c.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise _type_error(f"{q}.id", "a string", call_id)
        out.append({"id": call_id or f"call_{j}", "type": "function", "function": {"name": name, "arguments": args}})
    return out


def response_format(v, param: str = "response_format") -> ResponseFormat | None:
    """OpenAI's response_format (chat) or text.format (Responses, flat: name/schema/strict beside type)."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise _type_error(param, "an object", v)
    kind = v.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object", param=param)
    if kind != "json_schema":
        raise APIError(400, f"{param}.type must be text, json_object or json_schema, got {kind!r}", param=f"{param}.type",
                       code="invalid_value")
    spec = v.get("json_schema", v) if "json_schema" in v else v  # chat nests the spec; Responses has it flat
    q = f"{param}.json_schema" if "json_schema" in v else param
    if not isinstance(spec, dict):
        raise _type_error(q, "an object", spec)
    name, schema, strict = spec.get("name"), spec.get("schema"), spec.get("strict")
    if name is not None and (not isinstance(name, str) or not TOOL_NAME.fullmatch(name)):
        raise _bad(f"{q}.name", "must be 1-64 letters, digits, underscores or dashes")
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, (dict, bool)):
        raise _type_error(f"{q}.schema", "a JSON Schema object", schema)
    if strict is not None and not isinstance(strict, bool):
        raise _type_error(f"{q}.strict", "a boolean", strict)
    return ResponseFormat("json_schema", schema, bool(strict), name, f"{q}.schema")


def tools(v, flat: bool = False, param: str = "tools") -> list[Tool]:
    """Function tools. Chat nests each as {"type": "function", "function": {...}}; the Responses API is flat."""
    if v is None:
        return []
    if not isinstance(v, list):
        raise _type_error(param, "an array", v)
    if len(v) > MAX_TOOLS:
        raise _bad(param, f"at most {MAX_TOOLS} tools are allowed, got {len(v)}")
    out, seen = [], set()
    for i, t in enumerate(v):
        q = f"{param}[{i}]"
        if not isinstance(t, dict):
            raise _type_error(q, "an object", t)
        if t.get("type") != "function":
            raise APIError(400, f"{q}.type: only function tools are supported, got {t.get('type')!r}", param=f"{q}.type",
                           code="unsupported_parameter")
        fn = t if flat else t.get("function")
        fq = q if flat else f"{q}.function"
        if not isinstance(fn, dict):
            raise _type_error(fq, "an object", fn)
        name, desc, params, strict = fn.get("name"), fn.get("description", ""), fn.get("parameters"), fn.get("strict")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise _bad(f"{fq}.name", "must be 1-64 letters, digits, underscores or dashes")
        if name in seen:
            raise _bad(f"{fq}.name", f"two tools are named {name!r}")
        seen.add(name)
        if desc is not None and not isinstance(desc, str):
            raise _type_error(f"{fq}.description", "a string", desc)
        if params is not None and not isinstance(params, dict):
            raise _type_error(f"{fq}.parameters", "a JSON Schema object", params)
        if strict is not None and not isinstance(strict, bool):
            raise _type_error(f"{fq}.strict", "a boolean", strict)
        out.append(Tool(name, desc or "", params, bool(strict)))
    return out


def tool_choice(v, known: list[Tool], flat: bool = False) -> ToolChoice:
    """"none" / "auto" / "required" / a named function ({"type": "function", "function": {"name"}}; flat in Responses)."""
    if v is None:
        return ToolChoice("auto" if known else "none")
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise _bad("tool_choice", f"must be none, auto, required or a function, got {v!r}")
        if v == "required" and not known:
            raise _bad("tool_choice", "required needs tools")
        return ToolChoice(v)
    if not isinstance(v, dict) or v.get("type") != "function":
        raise _type_error("tool_choice", 'a string or {"type": "function", ...}', v)
    fn = v if flat else v.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _type_error("tool_choice.name" if flat else "tool_choice.function.name", "a string", name)
    if name not in {t.name for t in known}:
        raise _bad("tool_choice", f"names the function {name!r}, which is not in tools")
    return ToolChoice("function", name)


def _prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
    v = body.get("prompt")
    if v is None:
        raise APIError(400, "prompt is required", param="prompt", code="missing_required_parameter")

    def ids(x, p):
        if not x:
            raise _bad(p, "a token-id prompt must not be empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in x):
            raise _bad(p, f"token ids must be integers in 0..{vocab_size - 1}")
        return list(x)

    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise _type_error("prompt", "a string, an array of strings, or token ids", v) if not isinstance(v, list) else \
            _bad("prompt", "prompt must not be an empty array")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return [ids(v, "prompt")]
    if len(v) > MAX_PROMPTS:
        raise _bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, list):
            out.append(ids(x, f"prompt[{i}]"))
        else:
            raise _type_error(f"prompt[{i}]", "a string or token ids", x)
    return out


def parse_chat(body: dict) -> Request:
    ignored = _check_fields(body, _CHAT_FIELDS)
    model = _model(body)
    messages = _messages(body)
    if body.get("max_completion_tokens") is not None:
        max_tokens, param = _int(body, "max_completion_tokens", 1, MAX_INT, None), "max_completion_tokens"
    else:
        max_tokens, param = _int(body, "max_tokens", 1, MAX_INT, None), "max_tokens"
    stream, include_usage = _stream(body)
    logprobs = _bool(body, "logprobs", False)
    top_logprobs = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    if top_logprobs and not logprobs:
        raise _bad("top_logprobs", "top_logprobs requires logprobs to be true")
    tool_list = tools(body.get("tools"))
    return Request(
        kind="chat", model=model, messages=messages, prompts=[], max_tokens=max_tokens, max_tokens_param=param,
        n=_int(body, "n", 1, MAX_N, 1), stream=stream, include_usage=include_usage, stop=_stop(body),
        logprobs=logprobs, top_logprobs=top_logprobs, sampling=_sampling(body), ignored=ignored,
        response_format=response_format(body.get("response_format")), tools=tool_list,
        tool_choice=tool_choice(body.get("tool_choice"), tool_list), parallel_tool_calls=_bool(body, "parallel_tool_calls", True),
    )


def parse_completion(body: dict, vocab_size: int) -> Request:
    ignored = _check_fields(body, _COMPLETION_FIELDS, _UNSUPPORTED_COMMON | _COMPLETION_ONLY_DEFAULTS)
    model = _model(body)
    prompts = _prompts(body, vocab_size)
    stream, include_usage = _stream(body)
    # The legacy endpoint's logprobs is an integer: how many alternatives to list per token (0: only the chosen one).
    lp = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
    n = _int(body, "n", 1, MAX_N, 1)
    if n * len(prompts) > MAX_PROMPTS:
        raise _bad("n", f"n times the number of prompts must be at most {MAX_PROMPTS}")
    return Request(
        kind="completion", model=model, messages=None, prompts=prompts,
        max_tokens=_int(body, "max_tokens", 1, MAX_INT, COMPLETIONS_DEFAULT_MAX_TOKENS), max_tokens_param="max_tokens",
        n=n, stream=stream, include_usage=include_usage, stop=_stop(body), logprobs=lp is not None,
        top_logprobs=lp or 0, sampling=_sampling(body), ignored=ignored,
    )


# ---- responses --------------------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class TokenLogprob:
    """One generated token's log-probability and its top alternatives, as (text, bytes, logprob)."""

    text: str
    raw: bytes
    logprob: float
    top: list[tuple[str, bytes, float]]


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    def one(text, raw, lp):
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {"content": [{**one(e.text, e.raw, e.logprob), "top_logprobs": [one(*t) for t in e.top]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], text_offset: int, with_top: bool) -> dict:
    """The legacy format: parallel arrays; text_offset counts characters from the start of this choice's text."""
    offsets, pos = [], text_offset
    for e in entries:
        offsets.append(pos)
        pos += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries] if with_top else None,
        "text_offset": offsets,
    }


def chat_completion(id_: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}


def finish_reason_value(reason: "FinishReason | None") -> str | None:
    """The wire value of a finish reason: the plain string ("stop", "length"), whatever encoder writes the JSON."""
    return None if reason is None else str(reason)  # FinishReason.__str__ is its value


def chat_choice(index: int, text: str, finish_reason: "FinishReason | str", logprobs: dict | None,
                tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["content"] = text or None
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason_value(finish_reason)}


def chat_chunk(id_: str, created: int, model: str, choices: list[dict], usage_field: bool, use: dict | None = None) -> dict:
    """One streamed chunk. With stream_options.include_usage every chunk has a `usage` key: null, except in the
    last one (choices: [])."""
    chunk = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
             "system_fingerprint": None}
    if usage_field:
        chunk["usage"] = use
    return chunk


def chat_delta(index: int, delta: dict, finish_reason: "FinishReason | None" = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason_value(finish_reason)}


def text_completion(id_: str, created: int, model: str, choices: list[dict], usage_field: bool, use: dict | None) -> dict:
    """A whole /v1/completions response (usage_field True) or one streamed chunk (usage_field as for chat_chunk)."""
    out = {"id": id_, "object": "text_completion", "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if usage_field:
        out["usage"] = use
    return out


def text_choice(index: int, text: str, finish_reason: "FinishReason | None", logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason_value(finish_reason)}


def model_list(name: str, created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "tinyserve",
                                        "max_model_len": max_model_len}]}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_PING = b": ping\n\n"
