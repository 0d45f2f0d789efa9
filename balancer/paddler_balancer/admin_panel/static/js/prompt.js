// Prompt page: a chat with a model group (the default one unless another is picked)
// over the balancer's inference WebSocket; the group travels as the socket's
// `model_group` query parameter. Tokens stream in as they are generated; Stop
// cancels the request on the balancer, which stops the agent and frees the slot.

import { api, credential, withQuery } from "./api.js";
import { humanize } from "./dashboard.js";
import { h, requestId } from "./dom.js";
import { onAgents } from "./live.js";

const TOKEN_KINDS = ["ContentToken", "ReasoningToken", "ToolCallToken", "UndeterminableToken"];

const OUTCOME_WORDS = {
  Timeout: "No agent answered in time: the request waited in the buffer, or the agent stopped sending tokens.",
  TooManyBufferedRequests: "The balancer's buffer is full, so it turned the request away. Try again shortly.",
};

class Socket {
  constructor(url, onMessage, onClose) {
    this.url = url;
    this.onMessage = onMessage;
    this.onClose = onClose;
    this.ws = null;
    this.ready = null;
  }

  open() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return this.ready;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    this.ready = new Promise((resolve, reject) => {
      ws.onopen = () => resolve(ws);
      ws.onerror = () => reject(new Error(`Cannot open the inference socket at ${this.url}.`));
    });
    ws.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.onMessage(message);
    };
    ws.onclose = () => {
      if (this.ws === ws) this.ws = null;
      this.onClose();
    };
    return this.ready;
  }
}

function metric(label, id) {
  return [h("dt", {}, label), h("dd", { id }, "–")];
}

export async function mount(main, config) {
  const history = [];
  let turn = null;

  const transcript = h("div", {
    class: "transcript", id: "transcript", role: "log", "aria-live": "polite", "aria-label": "Conversation",
  });
  const emptyHint = h("div", { class: "transcript-empty", id: "transcript-empty" },
    h("p", {}, h("strong", {}, "Send a message to the model.")),
    h("p", { class: "small" }, "It goes to the chosen model group through the balancer, like any client's request: "
      + "it waits in the buffer when every slot is busy."));
  transcript.append(emptyHint);

  const input = h("textarea", {
    id: "prompt-input", rows: "3", placeholder: "Ask something…", "aria-describedby": "composer-hint",
  });
  const sendButton = h("button", { type: "submit", class: "primary", id: "send" }, "Send");
  const stopButton = h("button", { type: "button", class: "danger", id: "stop", disabled: true, onclick: stop },
    "Stop");
  const composer = h("form", { class: "composer", id: "composer", "aria-label": "Compose a message" },
    h("label", { for: "prompt-input", class: "visually-hidden" }, "Message"),
    input,
    h("div", { class: "composer-row" },
      h("span", { class: "hint muted small", id: "composer-hint" }, "Enter sends · Shift+Enter adds a line"),
      stopButton, sendButton));

  const maxTokens = h("input", { type: "number", id: "max-tokens", min: "1", step: "1", value: "512" });
  const groupSelect = h("select", { id: "model-group" },
    h("option", { value: config.default_model_group }, config.default_model_group));
  let group = config.default_model_group;
  const thinking = h("input", { type: "checkbox", id: "enable-thinking" });
  const system = h("textarea", { id: "system-prompt", rows: "3", placeholder: "You are a helpful assistant." });
  const capacity = h("p", { class: "muted small", id: "capacity", "aria-live": "polite" }, "");

  main.append(
    h("div", { class: "page-header" },
      h("div", {},
        h("h1", {}, "Prompt"),
        h("p", { class: "lead" }, "Chat with the model of a model group through the inference WebSocket at ",
          h("code", {}, config.inference_socket_url), "."))),
    h("div", { class: "chat-layout" },
      h("section", { class: "chat", "aria-label": "Chat" }, transcript, composer),
      h("aside", { class: "side", "aria-label": "Options and statistics" },
        h("section", { class: "panel", "aria-labelledby": "options-title" },
          h("h2", { id: "options-title" }, "Options"),
          h("div", { class: "field" }, h("label", { for: "model-group" }, "Model group"), groupSelect,
            h("p", { class: "hint" }, "The group whose agents answer.")),
          h("div", { class: "field" }, h("label", { for: "max-tokens" }, "Max tokens"), maxTokens,
            h("p", { class: "hint" }, "The reply stops after this many tokens.")),
          h("div", { class: "field" },
            h("label", { class: "check", for: "enable-thinking" }, thinking, "Enable thinking"),
            h("p", { class: "hint" }, "Models that reason first show it in a collapsible block.")),
          h("div", { class: "field" }, h("label", { for: "system-prompt" }, "System prompt"), system),
          h("div", { class: "field" },
            h("button", { type: "button", id: "clear", onclick: clear }, "Clear conversation"))),
        h("section", { class: "panel", "aria-labelledby": "stats-title" },
          h("h2", { id: "stats-title" }, "Last response"),
          h("dl", { class: "metrics", id: "metrics" },
            metric("Time to first token", "m-ttft"),
            metric("Tokens per second", "m-tps"),
            metric("Prompt tokens", "m-prompt"),
            metric("Cached prompt tokens", "m-cached"),
            metric("Reply tokens", "m-content"),
            metric("Reasoning tokens", "m-reasoning"),
            metric("Served by", "m-agent")),
          capacity))),
  );

  const onSocketClose = () => {
    if (turn) finish("error", "The connection to the balancer closed.");
  };
  const socketUrl = (name) => withQuery(
    name === config.default_model_group ? config.inference_socket_url
      : withQuery(config.inference_socket_url, "model_group", name),
    "api_key", credential("inference"));
  let socket = new Socket(socketUrl(group), onMessage, onSocketClose);

  groupSelect.addEventListener("change", () => {
    group = groupSelect.value;
    const previous = socket;
    socket = new Socket(socketUrl(group), onMessage, onSocketClose);
    if (previous.ws) previous.ws.close();
    showCapacity();
  });

  const knownGroups = new Set([config.default_model_group]);
  function addGroups(names) {
    for (const name of [...names].sort()) {
      if (knownGroups.has(name)) continue;
      knownGroups.add(name);
      groupSelect.append(h("option", { value: name }, name));
    }
  }
  api(config.management_url, "/api/v1/model_groups")
    .then((body) => addGroups((body.model_groups || []).map((g) => g.name)))
    .catch(() => {}); // the agents stream still lists the groups that have agents

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });

  const agentNames = new Map();
  let knownAgents = [];
  function showCapacity() {
    const members = knownAgents.filter((a) => a.model_group === group);
    const total = members.reduce((s, a) => s + a.slots_total, 0);
    const busy = members.reduce((s, a) => s + a.slots_in_flight, 0);
    const which = group === config.default_model_group ? "the default group" : `group ${group}`;
    capacity.textContent = members.length
      ? `${total - busy} of ${total} slots free on ${members.length} agent${members.length === 1 ? "" : "s"}.`
      : `No agent serves ${which}: requests wait in the buffer until one connects.`;
  }
  onAgents(config, (agents) => {
    knownAgents = agents;
    for (const a of agents) agentNames.set(a.id, a.name || a.id);
    addGroups(new Set(agents.map((a) => a.model_group).filter(Boolean)));
    showCapacity();
  });

  function setBusy(busy) {
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
    groupSelect.disabled = busy;
  }

  async function send() {
    const text = input.value.trim();
    if (!text || turn) return;
    emptyHint.remove();
    input.value = "";
    history.push({ role: "user", content: text });
    transcript.append(h("div", { class: "message user" }, h("span", { class: "role" }, "You"),
      h("div", { class: "bubble" }, text)));
    const bubble = h("div", { class: "bubble" });
    const meta = h("div", { class: "meta" }, h("span", { class: "flag" }, "Waiting for a free slot…"));
    const el = h("div", { class: "message assistant", dataset: { state: "streaming" }, "aria-busy": "true" },
      h("span", { class: "role" }, "Assistant"), bubble, meta);
    transcript.append(el);
    transcript.scrollTop = transcript.scrollHeight;

    const conversation = [];
    if (system.value.trim()) conversation.push({ role: "system", content: system.value.trim() });
    conversation.push(...history);
    const id = requestId();
    turn = {
      id, el, bubble, meta, text: "", reasoning: "", reasoningEl: null, tokens: 0,
      startedAt: performance.now(), firstTokenAt: null, usage: null, agent: null,
    };
    setBusy(true);
    resetMetrics();
    const max = Math.max(1, parseInt(maxTokens.value, 10) || 512);
    const request = { Request: { id, request: { ContinueFromConversationHistory: {
      conversation_history: conversation,
      max_tokens: max,
      add_generation_prompt: true,
      enable_thinking: thinking.checked,
    } } } };
    try {
      const ws = await socket.open();
      if (!turn || turn.id !== id) return; // stopped while the socket was opening: send nothing
      ws.send(JSON.stringify(request));
    } catch (err) {
      if (turn && turn.id === id) finish("error", err.message);
    }
  }

  function stop() {
    if (!turn) return;
    const { id } = turn;
    if (socket.ws && socket.ws.readyState === WebSocket.OPEN) socket.ws.send(JSON.stringify({ Notification: { StopRespondingTo: id } }));
    finish("stopped");
  }

  function clear() {
    if (turn) stop();
    history.length = 0;
    transcript.replaceChildren(emptyHint);
    resetMetrics();
  }

  function onMessage(message) {
    if (!turn) return;
    if (message.Error) {
      if (message.Error.request_id && message.Error.request_id !== turn.id) return;
      const err = message.Error.error || {};
      finish("error", `${err.description || "The request failed."}${err.code ? ` (${err.code})` : ""}`);
      return;
    }
    const envelope = message.Response;
    if (!envelope || envelope.request_id !== turn.id) return;
    if (envelope.generated_by) turn.agent = envelope.generated_by;
    const payload = envelope.response;
    if (typeof payload === "string") {
      finish("error", OUTCOME_WORDS[payload] || payload);
      return;
    }
    const generated = payload && payload.GeneratedToken;
    if (!generated) {
      finish("error", `Unexpected response: ${JSON.stringify(payload)}`);
      return;
    }
    const kind = TOKEN_KINDS.find((k) => k in generated);
    if (kind) {
      token(kind, generated[kind]);
    } else if (generated.Done) {
      turn.usage = generated.Done.usage || null;
      finish("done");
    } else {
      const [[variant, detail]] = Object.entries(generated);
      finish("error", `${humanize(variant)}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
  }

  function token(kind, text) {
    if (turn.firstTokenAt === null) {
      turn.firstTokenAt = performance.now();
      turn.meta.replaceChildren(h("span", { class: "flag" }, "Generating…"));
      document.getElementById("m-ttft").textContent = `${Math.round(turn.firstTokenAt - turn.startedAt)} ms`;
    }
    turn.tokens += 1;
    if (kind === "ReasoningToken") {
      if (!turn.reasoningEl) {
        turn.reasoningEl = h("div", {});
        turn.bubble.before(h("details", { class: "thinking", open: true }, h("summary", {}, "Thinking"),
          turn.reasoningEl));
      }
      turn.reasoning += text;
      turn.reasoningEl.textContent = turn.reasoning.trimStart();
    } else {
      turn.text += text;
      turn.bubble.textContent = turn.text.trimStart();
    }
    const nearBottom = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 80;
    if (nearBottom) transcript.scrollTop = transcript.scrollHeight;
  }

  function finish(state, detail) {
    if (!turn) return;
    const t = turn;
    turn = null;
    setBusy(false);
    const end = performance.now();
    t.el.dataset.state = state;
    t.el.removeAttribute("aria-busy");
    if (t.reasoningEl) t.reasoningEl.parentElement.open = false;
    if (t.text || t.reasoning) {
      history.push({ role: "assistant", content: t.text });
    } else if (state !== "done") {
      history.pop(); // nothing came back: drop the question so a retry is not sent twice
    }
    const parts = [];
    if (state === "stopped") parts.push(h("span", { class: "flag warn" }, "Stopped"));
    if (state === "error") parts.push(h("span", { class: "flag bad", role: "alert" }, detail));
    if (t.firstTokenAt !== null) {
      parts.push(h("span", { class: "ttft" }, `Time to first token ${Math.round(t.firstTokenAt - t.startedAt)} ms`));
      const seconds = (end - t.firstTokenAt) / 1000;
      const rate = t.tokens > 1 && seconds > 0 ? (t.tokens - 1) / seconds : null;
      parts.push(h("span", {}, `${t.tokens} token${t.tokens === 1 ? "" : "s"}`));
      if (rate !== null) parts.push(h("span", {}, `${rate.toFixed(1)} tokens/s`));
      document.getElementById("m-tps").textContent = rate !== null ? rate.toFixed(1) : "–";
    }
    if (t.usage) {
      parts.push(h("span", { class: "usage" }, `Usage: ${t.usage.prompt_tokens} prompt + ${t.usage.content_tokens} reply`
        + (t.usage.reasoning_tokens ? ` + ${t.usage.reasoning_tokens} reasoning` : "") + " tokens"));
      document.getElementById("m-prompt").textContent = String(t.usage.prompt_tokens ?? "–");
      document.getElementById("m-cached").textContent = String(t.usage.cached_prompt_tokens ?? "–");
      document.getElementById("m-content").textContent = String(t.usage.content_tokens ?? "–");
      document.getElementById("m-reasoning").textContent = String(t.usage.reasoning_tokens ?? "–");
    } else if (t.tokens) {
      document.getElementById("m-content").textContent = String(t.tokens);
    }
    if (t.agent) document.getElementById("m-agent").textContent = agentNames.get(t.agent) || t.agent.slice(0, 12);
    t.meta.replaceChildren(...parts);
    input.focus();
  }

  function resetMetrics() {
    for (const id of ["m-ttft", "m-tps", "m-prompt", "m-cached", "m-content", "m-reasoning", "m-agent"]) {
      document.getElementById(id).textContent = "–";
    }
  }
}
