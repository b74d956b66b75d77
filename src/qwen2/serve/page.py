"""The chat page served at `/`: one HTML file, no external assets, streams replies over SSE.

It posts the conversation to /v1/chat/completions with `stream: true` and appends each delta as it
arrives (fetch + ReadableStream; EventSource cannot POST). Each reply bubble carries data-done and
data-chunks, which the headless-browser test reads. `__MODEL__` is replaced by the served name.
An API key, if the server wants one, is typed into the key field and kept in the page only.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>qwen2 chat</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 46rem; margin: 0 auto; padding: 1rem;
         color: #222; }
  header { display: flex; gap: .5rem; align-items: baseline; }
  header h1 { font-size: 1.1rem; margin: 0 auto 0 0; }
  #log { border: 1px solid #ccc; border-radius: 6px; min-height: 20rem; padding: .5rem; overflow-y: auto; }
  .msg { white-space: pre-wrap; margin: .4rem 0; padding: .4rem .6rem; border-radius: 6px; }
  .user { background: #e8f0fe; }
  .assistant { background: #f3f3f3; }
  .error { background: #fde8e8; color: #900; }
  form { display: flex; gap: .5rem; margin-top: .5rem; }
  #input { flex: 1; padding: .5rem; }
</style>
</head>
<body>
<header><h1>qwen2 &middot; <span id="model">__MODEL__</span></h1>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" step="1" value="256"></label>
  <input id="key" type="password" placeholder="API key (optional)" size="16"></header>
<div id="log" aria-live="polite"></div>
<form id="form"><input id="input" autocomplete="off" placeholder="Type a message" required>
  <button id="send" type="submit">Send</button></form>
<script>
const MODEL = document.getElementById("model").textContent;
const log = document.getElementById("log"), form = document.getElementById("form");
const input = document.getElementById("input"), send = document.getElementById("send");
const history = [];

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function ask(text) {
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.done = "false";
  out.dataset.chunks = "0";
  const headers = {"Content-Type": "application/json"};
  const key = document.getElementById("key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers,
      body: JSON.stringify({model: MODEL, messages: history, stream: true,
                            max_tokens: Number(document.getElementById("max-tokens").value),
                            temperature: Number(document.getElementById("temperature").value)})});
    if (!resp.ok) {
      const err = await resp.json();
      throw new Error(err.error ? err.error.message : resp.statusText);
    }
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\\n\\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const ev = JSON.parse(line.slice(6));
        for (const ch of ev.choices || []) {
          if (ch.delta && ch.delta.content) {
            out.textContent += ch.delta.content;
            out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
          }
        }
        log.scrollTop = log.scrollHeight;
      }
    }
    history.push({role: "assistant", content: out.textContent});
  } catch (e) {
    out.className = "msg error";
    out.textContent = "error: " + e.message;
    history.pop();
  }
  out.dataset.done = "true";
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  send.disabled = true;
  await ask(text);
  send.disabled = false;
  input.focus();
});
</script>
</body>
</html>
"""
