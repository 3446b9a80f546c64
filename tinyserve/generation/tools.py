"""Tool calling: showing tools to the model, and finding the calls in what it writes.

The call syntax is Hermes' (what Qwen2.5's chat template teaches):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows tools (it mentions them) renders them, the assistant's earlier calls and the tool
results itself (`apply_chat_template(..., tools=...)`). For any other template (SmolLM2's), the generic format: a
system message lists the tools as JSON Schemas and asks for the syntax above; earlier calls become that syntax in the
assistant's text and each tool result a user message wrapped in <tool_response>. tool_choice "required" or a named
function is enforced by a grammar of this syntax (grammar.Grammars.tool_calls), so the reply always parses.
"""

import json
import uuid
from dataclasses import dataclass

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"
OPEN, CLOSE = OPEN_TAG + "\n", "\n" + CLOSE_TAG  # as a call is written: the tags on lines of their own

GENERIC_PROMPT = """You can call functions. The functions, as JSON Schemas:
{tools}

To call a function, answer with one line per call, exactly in this form and nothing else:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>
A function's result comes back in <tool_response></tool_response>. If no function is needed, answer normally."""


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's wire format)
    id: str = ""

    def __post_init__(self):
        self.id = self.id or "call_" + uuid.uuid4().hex[:24]

    def wire(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template and "tool_calls" in template


def chat_ids(tok, messages: list[dict], tools: list[dict]) -> list[int]:
    """Prompt ids for a conversation that may hold tool calls and results, with `tools` (chat-template form:
    {"type": "function", "function": {"name", "description", "parameters"}}) shown to the model."""
    if template_knows_tools(tok.hf.chat_template):
        return tok.chat_ids(messages, tools=tools or None)
    return tok.chat_ids(generic_messages(messages, tools))


def generic_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages with tool calls and results (chat-template form) -> plain system/user/assistant messages, the tools
    described in the system message (GENERIC_PROMPT)."""
    out = []
    if tools:
        listing = "\n".join(json.dumps(t["function"]) for t in tools)
        prompt = GENERIC_PROMPT.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + prompt})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}  # parallel calls' results
            else:
                out.append({"role": "user", "content": text})
        elif m.get("tool_calls"):
            calls = "\n".join(OPEN + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                              + CLOSE for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            out.append(m)
    return out


def parse_call(body: str, names: set[str]) -> ToolCall | None:
    """The JSON between the tags -> a ToolCall, or None if it is not {"name": <a known tool>, "arguments": {...}}."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class CallParser:
    """Splits streamed text into content and tool calls. Text that may be the start of <tool_call> is held back
    until it is or is not, and so is trailing whitespace (the newlines around calls are not content); a call is
    emitted whole once its </tool_call> arrives. A block that does not parse as a call of a known tool stays content
    (auto: the model's text is the answer)."""

    def __init__(self, names: set[str]):
        self.names = names
        self.buf = ""  # text not yet classified: a possible opening tag, or an open call block
        self.ws = ""  # whitespace held back from the end of the content
        self.inside = False
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """New text -> (content safe to show now, calls completed now)."""
        self.buf += text
        content, calls = "", []
        while True:
            if not self.inside:
                i = self.buf.find(OPEN_TAG)
                cut = i if i >= 0 else len(self.buf) - _partial_suffix(self.buf, OPEN_TAG)
                content += self.buf[:cut]
                self.buf = self.buf[cut:]
                if i < 0:
                    break
                self.inside = True
            j = self.buf.find(CLOSE_TAG)
            if j < 0:
                break
            end = j + len(CLOSE_TAG)
            block, self.buf, self.inside = self.buf[:end], self.buf[end:], False
            call = parse_call(block[len(OPEN_TAG): -len(CLOSE_TAG)], self.names)
            if call is None:
                content += block
            else:
                calls.append(call)
        self.calls += calls
        return self._content(content), calls

    def _content(self, text: str) -> str:
        text = self.ws + text
        body = text.rstrip()
        self.ws = text[len(body):]
        return body

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end: an unterminated block is a call if its JSON is complete (the model stopped before the closing
        tag), else content; whitespace held back is content only when there was no call."""
        rest, self.buf = self.buf, ""
        if self.inside:
            self.inside = False
            call = parse_call(rest[len(OPEN_TAG):], self.names)
            if call is not None:
                self.calls.append(call)
                return "", [call]
        ws, self.ws = self.ws, ""
        if self.calls and not rest.strip():
            return "", []
        return ws + rest, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
