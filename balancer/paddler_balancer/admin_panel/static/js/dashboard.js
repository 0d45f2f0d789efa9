// Dashboard: balancer addresses, buffered requests and one live card per agent.

import { api, subscribe } from "./api.js";
import { copyButton, formatBytes, h } from "./dom.js";
import { onAgents } from "./live.js";

const STATE_WORDS = {
  Applied: { tone: "ok", text: "Desired state applied" },
  Fresh: { tone: "idle", text: "Not applied yet" },
  AttemptedAndRetrying: { tone: "warn", text: "Applying the desired state failed; retrying" },
  AttemptedAndNotAppliable: { tone: "bad", text: "The desired state cannot be applied" },
  Stuck: { tone: "bad", text: "Stuck while applying the desired state" },
};

export function stateWords(status) {
  return STATE_WORDS[status] || { tone: "idle", text: status || "Unknown" };
}

export function isDownloading(agent) {
  return Boolean(agent.download_indeterminate
    || (agent.download_total > 0 && agent.download_current < agent.download_total));
}

/** The state in plain words; a download in progress says so. */
export function agentStateWords(agent) {
  if (isDownloading(agent) && agent.state_application_status !== "Applied") {
    return { tone: "warn", text: "Downloading the model" };
  }
  return stateWords(agent.state_application_status);
}

/** AgentIssue serde: "Variant" or {"Variant": {"message": ..., ...}}. */
export function issueText(issue) {
  if (typeof issue === "string") return { title: humanize(issue), message: "" };
  const [[variant, params]] = Object.entries(issue);
  const message = params && typeof params === "object"
    ? params.message || Object.entries(params).map(([k, v]) => `${k}: ${v}`).join(", ")
    : String(params ?? "");
  return { title: humanize(variant), message };
}

export function humanize(variant) {
  const words = variant.replace(/([a-z0-9])([A-Z])/g, "$1 $2").toLowerCase();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function stat(label, valueId, initial) {
  return h("div", { class: "stat" },
    h("div", { class: "stat-label", id: `${valueId}-label` }, label),
    h("div", { class: "stat-value", id: valueId }, initial));
}

export async function mount(main, config) {
  const bufferStat = stat("Buffered requests", "stat-buffered", "0");
  bufferStat.querySelector(".stat-value").setAttribute("aria-live", "polite");
  const openaiUrl = `${config.inference_url}/v1`;
  const grid = h("ul", { class: "agent-grid", id: "agents", "aria-label": "Agents" });
  const groupsBody = h("tbody", { id: "groups" });
  const groupsPanel = h("section", { class: "panel", id: "groups-panel", hidden: true, "aria-labelledby": "groups-title" },
    h("h2", { id: "groups-title" }, "Model groups"),
    h("table", { class: "rollout" },
      h("thead", {}, h("tr", {}, ...["Group", "Desired model", "Agents", "Slots busy", "Managed by"].map(
        (t) => h("th", { scope: "col" }, t)))),
      groupsBody));
  const emptyState = h("div", { class: "empty", id: "agents-empty", hidden: true },
    h("h3", {}, "No agents connected"),
    h("p", { class: "muted" },
      "Agents dial in to the balancer and offer their slots. Start one on any machine that can reach this balancer; "
      + "it downloads and loads the model set on the Model page."),
    h("div", { class: "command" },
      h("code", { id: "agent-command" }, config.agent_command),
      copyButton(config.agent_command, "Copy command")));

  main.append(
    h("div", { class: "page-header" },
      h("div", {},
        h("h1", {}, "Dashboard"),
        h("p", { class: "lead" }, "Agents connected to this balancer, their slots and the requests waiting for one."))),
    h("section", { class: "stats", "aria-label": "Summary" },
      stat("Agents", "stat-agents", "0"),
      stat("Slots busy", "stat-slots", "0"),
      bufferStat,
      stat("Models served", "stat-models", "0")),
    h("section", { class: "panel", "aria-labelledby": "addresses-title" },
      h("h2", { id: "addresses-title" }, "Balancer addresses"),
      h("dl", { class: "addresses" },
        h("dt", {}, "Inference API"), h("dd", { id: "inference-url" }, config.inference_url),
        copyButton(config.inference_url, "Copy inference URL"),
        h("dt", {}, "OpenAI-compatible"), h("dd", {}, openaiUrl), copyButton(openaiUrl, "Copy OpenAI base URL"),
        h("dt", {}, "Management API"), h("dd", { id: "management-url" }, config.management_url),
        copyButton(config.management_url, "Copy management URL"))),
    groupsPanel,
    h("section", { "aria-labelledby": "agents-title" },
      h("div", { class: "panel-header" },
        h("h2", { id: "agents-title" }, "Agents"),
        h("span", { class: "muted small", id: "agents-summary", "aria-live": "polite" }, "")),
      emptyState,
      grid),
  );

  subscribe(`${config.management_url}/api/v1/buffered_requests/stream`, (body) => {
    const n = body.buffered_requests_current ?? 0;
    const el = document.getElementById("stat-buffered");
    el.replaceChildren(String(n), h("small", {}, ` / ${config.max_buffered_requests}`));
    bufferStat.dataset.alert = n > 0 ? "true" : "false";
  });

  // Pools that serve several models: one row per model group (its desired model comes
  // from the management API, refreshed when the set of groups changes; counts are live).
  let groupStates = new Map();
  let groupsKey = "";
  async function loadGroupStates() {
    try {
      const body = await api(config.management_url, "/api/v1/model_groups");
      groupStates = new Map((body.model_groups || []).map((g) => [g.name, g]));
    } catch {
      // keep the last known states; the connection indicator tells the rest
    }
  }

  function renderGroups(agents) {
    const names = new Set([...groupStates.keys(), ...agents.map((a) => a.model_group)]);
    groupsPanel.hidden = names.size < 2;
    if (names.size < 2) return;
    groupsBody.replaceChildren(...[...names].sort().map((name) => {
      const members = agents.filter((a) => a.model_group === name);
      const total = members.reduce((n, a) => n + a.slots_total, 0);
      const busy = members.reduce((n, a) => n + a.slots_in_flight, 0);
      const entry = groupStates.get(name);
      const source = entry ? entry.desired_state.model : "None";
      const described = source && typeof source === "object" ? describeSource(source) : null;
      return h("tr", { dataset: { group: name } },
        h("td", {}, h("a", { href: `/model?group=${encodeURIComponent(name)}` }, name)),
        h("td", {}, described ? modelLabel(described) : h("span", { class: "muted" }, "none")),
        h("td", {}, String(members.length)),
        h("td", {}, total ? `${busy} / ${total}` : h("span", { class: "muted" }, "none open")),
        h("td", {}, entry && entry.owner ? h("code", {}, entry.owner) : h("span", { class: "muted" }, "edited here")));
    }));
  }

  const cards = new Map();
  onAgents(config, (agents) => {
    const seen = new Set();
    agents.forEach((agent, index) => {
      seen.add(agent.id);
      const key = JSON.stringify(agent);
      let entry = cards.get(agent.id);
      if (!entry || entry.key !== key) {
        const card = agentCard(agent);
        if (entry) entry.el.replaceWith(card);
        entry = { el: card, key };
        cards.set(agent.id, entry);
      }
      if (grid.children[index] !== entry.el) grid.insertBefore(entry.el, grid.children[index] || null);
    });
    for (const [id, entry] of cards) {
      if (!seen.has(id)) {
        entry.el.remove();
        cards.delete(id);
      }
    }
    const total = agents.reduce((s, a) => s + a.slots_total, 0);
    const busy = agents.reduce((s, a) => s + a.slots_in_flight, 0);
    const models = new Set(agents.map((a) => a.model_path).filter(Boolean));
    document.getElementById("stat-agents").textContent = String(agents.length);
    document.getElementById("stat-slots").replaceChildren(String(busy), h("small", {}, ` / ${total}`));
    document.getElementById("stat-models").textContent = String(models.size);
    document.getElementById("agents-summary").textContent =
      agents.length ? `${agents.length} connected · ${total - busy} free slot${total - busy === 1 ? "" : "s"}` : "";
    emptyState.hidden = agents.length > 0;
    grid.hidden = agents.length === 0;
    const key = [...new Set(agents.map((a) => a.model_group))].sort().join(",");
    if (key !== groupsKey) {
      groupsKey = key;
      loadGroupStates().then(() => renderGroups(latestAgents));
    }
    latestAgents = agents;
    renderGroups(agents);
  });
}

let latestAgents = [];

/** The desired model source in a few words (the same label agents report as model_path). */
export function describeSource(source) {
  if (source.HuggingFace) return `${source.HuggingFace.repo_id}/${source.HuggingFace.filename}`;
  if (source.Url) return source.Url.url;
  if (source.LocalToAgent) return source.LocalToAgent;
  return null;
}

/** A model path as "folder/" (muted) over "file" (emphasised): long paths stay readable. */
export function modelLabel(path) {
  if (!path) return h("span", { class: "muted" }, "No model loaded");
  const cut = path.lastIndexOf("/");
  if (cut <= 0 || cut === path.length - 1) return h("span", { class: "model-file" }, path);
  return h("span", { class: "model-label" },
    h("span", { class: "model-dir" }, path.slice(0, cut + 1)),
    h("span", { class: "model-file" }, path.slice(cut + 1)));
}

function agentCard(agent) {
  const name = agent.name || agent.id;
  const titleId = `agent-${agent.id}-name`;
  const state = agentStateWords(agent);
  const total = agent.slots_total;
  const busy = agent.slots_in_flight;
  const pct = total > 0 ? Math.min(100, Math.round((busy / total) * 100)) : 0;
  const slotsText = total > 0 ? `${busy} of ${total} busy` : "No slots open yet";

  const facts = h("dl", { class: "facts" },
    h("dt", {}, "Model"),
    h("dd", { class: "agent-model", title: agent.model_path || "" }, modelLabel(agent.model_path)),
    h("dt", {}, "State"),
    h("dd", {}, h("span", { class: "status agent-state", dataset: { tone: state.tone } },
      h("span", { class: "dot", "aria-hidden": "true" }), state.text)),
    h("dt", {}, "Processing"),
    h("dd", {}, `${agent.slots_processing} sequence${agent.slots_processing === 1 ? "" : "s"}`
      + (agent.desired_slots_total && agent.desired_slots_total !== total
        ? ` · wants ${agent.desired_slots_total} slots` : "")),
  );
  if (agent.uses_chat_template_override) {
    facts.append(h("dt", {}, "Template"), h("dd", {}, "Chat template override"));
  }

  const slots = h("div", { class: "slots" },
    h("div", { class: "meter-row" }, h("span", {}, "Slots"), h("span", { class: "agent-slots" }, slotsText)),
    h("div", {
      class: "bar", role: "progressbar", "aria-label": `Slots busy on ${name}`,
      "aria-valuemin": "0", "aria-valuemax": String(total), "aria-valuenow": String(busy), "aria-valuetext": slotsText,
    }, h("div", { class: "bar-fill", style: { width: `${pct}%` }, dataset: { full: String(total > 0 && busy >= total) } })));

  const card = h("li", { class: "agent-card", dataset: { agentId: agent.id }, "aria-labelledby": titleId },
    h("header", {},
      h("div", {},
        h("h3", { id: titleId, class: "agent-name" }, name),
        h("div", { class: "agent-id" }, agent.id)),
      h("span", { class: "badge accent", title: "Model group" }, agent.model_group)),
    facts,
    slots);

  if (isDownloading(agent)) {
    const file = agent.download_filename || "model";
    const pctDl = agent.download_total > 0 ? Math.floor((agent.download_current / agent.download_total) * 100) : 0;
    const text = agent.download_indeterminate
      ? `${formatBytes(agent.download_current)} so far`
      : `${pctDl}% · ${formatBytes(agent.download_current)} of ${formatBytes(agent.download_total)}`;
    card.append(h("div", { class: "download" },
      h("div", { class: "meter-row" }, h("span", {}, "Downloading"), h("span", {}, text)),
      h("div", { class: "download-file mono" }, file),
      h("div", {
        class: `bar${agent.download_indeterminate ? " indeterminate" : ""}`, role: "progressbar",
        "aria-label": `Download of ${file}`, "aria-valuemin": "0", "aria-valuemax": "100",
        "aria-valuenow": agent.download_indeterminate ? undefined : String(pctDl), "aria-valuetext": text,
      }, h("div", { class: "bar-fill", style: agent.download_indeterminate ? {} : { width: `${pctDl}%` } }))));
  }

  if (agent.issues && agent.issues.length) {
    card.append(h("ul", { class: "issues", "aria-label": `Issues on ${name}` },
      agent.issues.map((issue) => {
        const { title, message } = issueText(issue);
        return h("li", {}, h("strong", {}, title), message);
      })));
  }
  return card;
}
