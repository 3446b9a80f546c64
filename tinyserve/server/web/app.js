// The chat page: keeps the conversation in memory, streams replies from /v1/chat/completions (server-sent events
// read off fetch's body stream), and shows tokens/s. Text is always inserted as textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // [{role, content}] of the finished turns
let modelName = null;
let controller = null;  // AbortController of the reply being streamed

const keyBox = $("api-key");
keyBox.value = localStorage.getItem("tinyserve-api-key") || "";
keyBox.addEventListener("change", () => {
  localStorage.setItem("tinyserve-api-key", keyBox.value);
  showError("");
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
  return h;
}

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = "model unavailable";
    showError("Could not list models: " + e.message);
  }
}

// Yields each JSON payload of an SSE stream; stops at [DONE]. Comment lines (": ping") are skipped.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  showError("");
  if (!modelName) await loadModel();
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history, { role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  setBusy(true);
  controller = new AbortController();
  const t0 = performance.now();
  // tokens: content chunks while streaming (about one per token), then the server's exact count from the usage chunk.
  let tFirst = null, reply = "", tokens = 0, finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: modelName,
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value) || undefined,
        response_format: responseFormat(),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => null);
      throw new Error(body && body.error ? body.error.message : r.status + " " + r.statusText);
    }
    for await (const ev of events(r)) {
      if (ev.error) throw new Error(ev.error.message);
      if (ev.usage) tokens = ev.usage.completion_tokens;
      for (const c of ev.choices || []) {
        if (c.delta && c.delta.content) {
          if (tFirst === null) tFirst = performance.now();
          tokens += 1;
          reply += c.delta.content;
          out.textContent = reply;
          out.scrollIntoView({ block: "end" });
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
      showStats(tokens, t0, tFirst, finish);
    }
    showStats(tokens, t0, tFirst, finish);
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
    else finish = "stopped";
  } finally {
    out.classList.remove("streaming");
    setBusy(false);
    controller = null;
  }
  if (reply) {
    history.push({ role: "user", content: text }, { role: "assistant", content: reply });
  } else {
    out.remove();
  }
}

// The JSON-mode switch: any JSON object, or JSON valid against the schema typed in (the server checks it: 400 if bad).
function responseFormat() {
  if (!$("json-mode").checked) return undefined;
  const text = $("json-schema").value.trim();
  if (!text) return { type: "json_object" };
  let schema;
  try {
    schema = JSON.parse(text);
  } catch (e) {
    throw new Error("the JSON Schema is not valid JSON: " + e.message);
  }
  return { type: "json_schema", json_schema: { name: "reply", schema, strict: true } };
}

function showStats(tokens, t0, tFirst, finish) {
  if (tFirst === null) return;
  const now = performance.now();
  const ttft = ((tFirst - t0) / 1000).toFixed(2);
  let s = `first token ${ttft} s`;
  if (tokens) {
    const secs = (now - tFirst) / 1000;
    const rate = secs > 0 ? (tokens - 1) / secs : 0;
    s += ` · ${tokens} tokens · ${rate.toFixed(1)} tokens/s`;
  }
  if (finish) s += ` · ${finish}`;
  $("stats").textContent = s;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("stats").textContent = "";
  showError("");
});

loadModel();
