// edgelm chat page: plain JavaScript, no framework, no build step, nothing fetched from elsewhere.
// It talks to the server's OpenAI routes (relative URLs, so a reverse proxy under a sub-path works too):
// GET v1/models for the picker, POST v1/chat/completions with stream:true read as server-sent events.
// Model text is only ever put into the page as text nodes (textContent), never parsed as HTML.

const STORE = "edgelm.chat.v1";     // the conversation and the settings
const KEY_STORE = "edgelm.apiKey";  // the API key, when the server asks for one

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), modelStatus: $("model-status"), temperature: $("temperature"),
  temperatureValue: $("temperature-value"), maxTokens: $("max-tokens"), system: $("system"),
  newChat: $("new-chat"), changeKey: $("change-key"), error: $("error"), errorText: $("error-text"),
  errorDismiss: $("error-dismiss"), messages: $("messages"), empty: $("empty"), composer: $("composer"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
  keyMessage: $("key-message"), keyInput: $("key-input"), keyCancel: $("key-cancel"),
};

class ApiError extends Error {
  constructor(status, message) {
    super(status ? `Error ${status}: ${message}` : message);
    this.status = status;
  }
}

const SERVER_GONE = "Cannot reach the edgelm server. Is `edgelm serve` still running?";
const CONNECTION_LOST = "The connection to the server was lost before the answer finished. " +
  "Is `edgelm serve` still running?";

// ---------------------------------------------------------------- state, kept in this browser

const DEFAULTS = { model: "", temperature: 0.7, max_tokens: 512, system: "" };
let state = restore();
let running = null;           // {controller, message} while an answer streams
const elements = new WeakMap(); // message -> its <li>

function restore() {
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(STORE) || "null"); } catch { saved = null; }
  const messages = Array.isArray(saved?.messages) ? saved.messages.filter(
    (m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string") : [];
  for (const m of messages) if (m.state === "streaming") m.state = "stopped"; // the page went away mid-answer
  return { messages, settings: { ...DEFAULTS, ...(saved?.settings || {}) } };
}

function save() {
  try { localStorage.setItem(STORE, JSON.stringify(state)); } catch { /* storage full or off: keep going */ }
}

// ---------------------------------------------------------------- rendering model text safely

// Fenced code blocks (``` or ~~~, an unclosed one runs to the end: the answer may still be streaming),
// inline `code`, paragraphs; everything else is plain text.
function renderText(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let para = [];
  const flush = () => {
    const body = para.join("\n").replace(/^\n+|\n+$/g, "");
    para = [];
    if (!body) return;
    for (const chunk of body.split(/\n{2,}/)) {
      const p = document.createElement("p");
      appendInline(p, chunk);
      out.append(p);
    }
  };
  for (let i = 0; i < lines.length; i++) {
    const open = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/.exec(lines[i]);
    if (!open) { para.push(lines[i]); continue; }
    flush();
    const fence = open[1];
    const code = [];
    let j = i + 1;
    while (j < lines.length && !new RegExp(`^ {0,3}${fence[0]}{${fence.length},}\\s*$`).test(lines[j])) {
      code.push(lines[j]);
      j++;
    }
    out.append(codeBlock(code.join("\n"), open[2]));
    i = j; // the closing fence (or the end)
  }
  flush();
  return out;
}

function appendInline(parent, text) {
  const parts = text.split(/(`[^`\n]+`)/);
  for (const part of parts) {
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
      const code = document.createElement("code");
      code.textContent = part.slice(1, -1);
      parent.append(code);
    } else if (part) {
      parent.append(document.createTextNode(part));
    }
  }
}

function codeBlock(text, language) {
  const figure = document.createElement("div");
  figure.className = "code";
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  if (language) {
    code.dataset.language = language;
    code.className = "language-" + language.replace(/[^\w+-]/g, "");
  }
  code.textContent = text;
  pre.append(code);
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy the ${language || "code"} block`);
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  figure.append(copy, pre);
  return figure;
}

function renderMessage(message) {
  let li = elements.get(message);
  if (!li) {
    li = document.createElement("li");
    li.className = "msg " + message.role;
    const who = document.createElement("p");
    who.className = "who";
    const content = document.createElement("div");
    content.className = "content";
    const note = document.createElement("p");
    note.className = "note";
    li.append(who, content, note);
    elements.set(message, li);
    ui.messages.append(li);
  }
  const [who, content, note] = li.children;
  who.textContent = message.role === "user" ? "You" : message.model || "Assistant";
  content.replaceChildren(renderText(message.content));
  li.dataset.state = message.state || "done";
  li.setAttribute("aria-busy", String(message.state === "streaming"));
  note.textContent = noteFor(message);
  note.classList.toggle("bad", message.state === "error");
  ui.empty.hidden = state.messages.length > 0;
  return li;
}

function noteFor(m) {
  if (m.role !== "assistant") return "";
  if (m.state === "streaming") return m.content ? "" : "Thinking…";
  if (m.state === "stopped") return "Stopped.";
  if (m.state === "error") return m.error || "Failed.";
  const parts = [];
  if (m.finish === "length") parts.push("Reached the max tokens setting.");
  if (m.tokens) parts.push(`${m.tokens} tokens`);
  if (m.tokensPerSecond) parts.push(`${m.tokensPerSecond.toFixed(1)} tokens/s`);
  return parts.join(" · ");
}

function renderAll() {
  ui.messages.replaceChildren();
  for (const m of state.messages) renderMessage(m);
  ui.empty.hidden = state.messages.length > 0;
}

function nearBottom() {
  const el = document.scrollingElement;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 120;
}

function scrollDown() {
  const el = document.scrollingElement;
  el.scrollTop = el.scrollHeight;
}

// ---------------------------------------------------------------- errors shown in the page

function showError(message) {
  ui.errorText.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.errorText.textContent = "";
}

async function errorMessage(response) {
  let text = "";
  try { text = await response.text(); } catch { /* body gone */ }
  try {
    const data = JSON.parse(text);
    const e = data?.error;
    if (typeof e?.message === "string") return e.message;          // OpenAI dialect
    if (typeof e === "string") return e;                            // Ollama dialect
    if (typeof data?.detail === "string") return data.detail;
  } catch { /* not JSON */ }
  return text.trim().slice(0, 500) || response.statusText || "no details";
}

// ---------------------------------------------------------------- the API key

let keyPrompt = null; // one dialog at a time, shared by concurrent requests

function askForKey(reason) {
  if (keyPrompt) return keyPrompt;
  keyPrompt = new Promise((resolve) => {
    ui.keyMessage.textContent = reason ||
      "This server asks for an API key (the --api-key given to edgelm serve). It is kept in this browser only.";
    ui.keyInput.value = "";
    const done = (ok) => {
      ui.keyForm.removeEventListener("submit", onSubmit);
      ui.keyCancel.removeEventListener("click", onCancel);
      ui.keyDialog.removeEventListener("cancel", onCancel);
      if (ui.keyDialog.open) ui.keyDialog.close();
      keyPrompt = null;
      resolve(ok);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const key = ui.keyInput.value.trim();
      if (!key) return;
      localStorage.setItem(KEY_STORE, key);
      done(true);
    };
    const onCancel = (event) => { event.preventDefault(); done(false); };
    ui.keyForm.addEventListener("submit", onSubmit);
    ui.keyCancel.addEventListener("click", onCancel);
    ui.keyDialog.addEventListener("cancel", onCancel);
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  });
  return keyPrompt;
}

// fetch with the key; a 401 asks for a key and tries again; other failures become ApiError
async function api(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    const key = localStorage.getItem(KEY_STORE);
    if (key) headers.set("Authorization", "Bearer " + key);
    let response;
    try {
      response = await fetch(path, { ...init, headers, cache: "no-store" });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, SERVER_GONE);
    }
    if (response.status === 401) {
      const message = await errorMessage(response);
      const ok = await askForKey(key ? `The server refused that key (${message}). Enter the right one.` : null);
      if (!ok) throw new ApiError(401, message + " Open Settings → API key… to enter it.");
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return response;
  }
}

// ---------------------------------------------------------------- models

async function loadModels() {
  ui.modelStatus.textContent = "Loading the model list…";
  try {
    const data = await (await api("v1/models")).json();
    const names = (data?.data || []).map((m) => String(m.id));
    if (!names.length) throw new ApiError(0, "The server serves no models.");
    ui.model.replaceChildren(...names.map((name) => new Option(name, name)));
    ui.model.value = names.includes(state.settings.model) ? state.settings.model : names[0];
    state.settings.model = ui.model.value;
    ui.modelStatus.textContent = `${names.length} model${names.length > 1 ? "s" : ""} available`;
    clearError();
    return true;
  } catch (err) {
    ui.modelStatus.textContent = "";
    showError("Could not list the models. " + err.message);
    return false;
  }
}

// ---------------------------------------------------------------- chat

function history() {
  const out = [];
  const system = state.settings.system.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of state.messages) {
    if (m.state === "streaming") continue;
    if (m.role === "assistant" && !m.content) { // a failed reply: drop its question too
      if (out.length && out[out.length - 1].role === "user") out.pop();
      continue;
    }
    out.push({ role: m.role, content: m.content });
  }
  return out;
}

async function send(text) {
  if (running || !text.trim()) return;
  if (!ui.model.value && !(await loadModels())) return;
  clearError();
  const question = { role: "user", content: text };
  state.messages.push(question);
  const messages = history();
  const answer = { role: "assistant", content: "", model: ui.model.value, state: "streaming" };
  state.messages.push(answer);
  save();
  renderMessage(question);
  renderMessage(answer);
  scrollDown();
  ui.prompt.value = "";
  await stream(answer, messages);
}

async function stream(answer, messages) {
  const controller = new AbortController();
  running = { controller, message: answer };
  setRunning(true);
  const body = {
    model: answer.model, messages, stream: true, stream_options: { include_usage: true },
    temperature: state.settings.temperature, max_tokens: state.settings.max_tokens,
  };
  let first = 0;
  try {
    const response = await api("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    let finished = false;
    await readEvents(response, (event) => {
      if (event === "[DONE]") { finished = true; return; }
      if (event.error) throw new ApiError(0, event.error.message || String(event.error));
      if (event.usage) answer.tokens = event.usage.completion_tokens;
      const choice = event.choices?.[0];
      const piece = choice?.delta?.content;
      if (piece) {
        const follow = nearBottom();
        if (!first) first = performance.now();
        answer.content += piece;
        renderMessage(answer);
        if (follow) scrollDown();
      }
      if (choice?.finish_reason) answer.finish = choice.finish_reason;
    });
    if (!finished && !answer.finish) throw new ApiError(0, CONNECTION_LOST);
    answer.state = "done";
    if (first && answer.tokens > 1) {
      answer.tokensPerSecond = (answer.tokens - 1) / Math.max(0.001, (performance.now() - first) / 1000);
    }
  } catch (err) {
    if (err.name === "AbortError") {
      answer.state = "stopped";
    } else {
      answer.state = "error";
      answer.error = err instanceof ApiError ? err.message : (err.name === "TypeError" ? CONNECTION_LOST :
        String(err.message || err));
      showError(answer.error);
    }
  } finally {
    running = null;
    setRunning(false);
    renderMessage(answer);
    save();
  }
}

// Server-sent events through fetch + ReadableStream: "data: ..." lines, events end with a blank line.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, CONNECTION_LOST);
    }
    if (chunk.done) break;
    buffer = (buffer + chunk.value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") { onEvent("[DONE]"); continue; }
      let event;
      try { event = JSON.parse(data); } catch { throw new ApiError(0, "The server sent an unreadable event."); }
      onEvent(event);
    }
  }
}

function setRunning(on) {
  ui.send.hidden = on;
  ui.stop.hidden = !on;
  ui.model.disabled = on;
  if (on) ui.stop.focus(); else if (document.activeElement === ui.stop || !document.activeElement ||
    document.activeElement === document.body) ui.prompt.focus();
}

// ---------------------------------------------------------------- wiring

function applySettings() {
  const s = state.settings;
  ui.temperature.value = s.temperature;
  ui.temperatureValue.textContent = Number(s.temperature).toFixed(2);
  ui.maxTokens.value = s.max_tokens;
  ui.system.value = s.system;
}

ui.temperature.addEventListener("input", () => {
  state.settings.temperature = Number(ui.temperature.value);
  ui.temperatureValue.textContent = state.settings.temperature.toFixed(2);
  save();
});
ui.maxTokens.addEventListener("change", () => {
  const n = Math.round(Number(ui.maxTokens.value));
  state.settings.max_tokens = Number.isFinite(n) && n >= 1 ? n : DEFAULTS.max_tokens;
  ui.maxTokens.value = state.settings.max_tokens;
  save();
});
ui.system.addEventListener("change", () => { state.settings.system = ui.system.value; save(); });
ui.model.addEventListener("change", () => { state.settings.model = ui.model.value; save(); });

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send(ui.prompt.value);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => running?.controller.abort());
ui.newChat.addEventListener("click", () => {
  running?.controller.abort();
  state.messages = [];
  save();
  renderAll();
  clearError();
  ui.prompt.focus();
});
ui.errorDismiss.addEventListener("click", clearError);
ui.changeKey.addEventListener("click", async () => {
  if (await askForKey("Enter the API key for this server (kept in this browser only).")) loadModels();
});
window.addEventListener("pagehide", save);

// for tests and the curious: the renderer, and whether an answer is streaming
window.edgelmChat = { renderText, get running() { return running !== null; } };

applySettings();
renderAll();
scrollDown();
loadModels();
ui.prompt.focus();
