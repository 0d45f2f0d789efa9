// Model page: edit the desired state of a model group (model source, inference
// parameters, chat template). The API validates; its messages land next to the
// field they name.

import { api, ApiError } from "./api.js";
import { h } from "./dom.js";
import { onAgents } from "./live.js";
import { agentStateWords, modelLabel } from "./dashboard.js";

const SOURCE_KINDS = [
  { kind: "HuggingFace", label: "Hugging Face" },
  { kind: "Url", label: "URL" },
  { kind: "LocalToAgent", label: "Local path" },
  { kind: "None", label: "None" },
];

/** Split the API's "a.b: msg; c.d: msg" into [{path, message}]. */
export function splitValidation(message) {
  return String(message)
    .split(/;\s+(?=[A-Za-z_][\w.[\]]*:\s)/)
    .map((part) => {
      const match = /^([A-Za-z_][\w.[\]]*):\s([\s\S]*)$/.exec(part);
      return match ? { path: match[1], message: match[2] } : { path: "", message: part };
    });
}

class ErrorBoard {
  constructor(summary) {
    this.slots = new Map();
    this.summary = summary;
  }

  register(path, errorEl, control, label) {
    this.slots.set(path, { errorEl, control, label });
  }

  clear() {
    for (const { errorEl, control } of this.slots.values()) {
      errorEl.textContent = "";
      if (control) control.removeAttribute("aria-invalid");
    }
    this.summary.replaceChildren();
  }

  show(message) {
    this.clear();
    const items = [];
    for (const { path, message: text } of splitValidation(message)) {
      let key = path;
      while (key && !this.slots.has(key)) key = key.includes(".") ? key.slice(0, key.lastIndexOf(".")) : "";
      const slot = key ? this.slots.get(key) : null;
      if (slot) {
        slot.errorEl.textContent = slot.errorEl.textContent ? `${slot.errorEl.textContent} ${text}` : text;
        if (slot.control) slot.control.setAttribute("aria-invalid", "true");
        const target = slot.control && slot.control.id ? `#${slot.control.id}` : null;
        items.push(h("li", {}, target ? h("a", { href: target }, slot.label) : slot.label, `: ${text}`));
      } else {
        items.push(h("li", {}, path ? `${path}: ${text}` : text));
      }
    }
    this.summary.replaceChildren(
      h("div", { class: "notice error", role: "alert" },
        h("p", {}, h("strong", {}, "The balancer did not accept this desired state.")),
        h("ul", {}, items)));
    const first = [...this.slots.values()].find((s) => s.control && s.control.getAttribute("aria-invalid"));
    if (first) first.control.focus();
  }
}

function field({ id, label, path, control, hint, extra, board }) {
  const error = h("p", { class: "error", id: `${id}-error`, dataset: { errorFor: path } });
  const hintEl = hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null;
  control.id = id;
  control.setAttribute("aria-describedby", [hintEl && hintEl.id, error.id].filter(Boolean).join(" "));
  control.dataset.path = path;
  board.register(path, error, control, label);
  return h("div", { class: "field", dataset: { field: path } },
    h("div", { class: "field-label" }, h("label", { for: id }, label), extra || null),
    control, hintEl, error);
}

function sourceEditor(prefix, board, legend, intro) {
  const name = `${prefix}-kind`;
  const inputs = {
    repo_id: h("input", { type: "text", placeholder: "e.g. bartowski/SmolLM2-135M-Instruct-GGUF", autocomplete: "off" }),
    filename: h("input", { type: "text", placeholder: "e.g. SmolLM2-135M-Instruct-Q4_K_M.gguf", autocomplete: "off" }),
    revision: h("input", { type: "text", placeholder: "main", autocomplete: "off" }),
    url: h("input", { type: "url", placeholder: "https://example.com/model.gguf", autocomplete: "off" }),
    sha256: h("input", { type: "text", placeholder: "optional, 64 hex digits", autocomplete: "off" }),
    local_path: h("input", { type: "text", placeholder: "/models/model.gguf", autocomplete: "off" }),
  };
  const groups = {
    HuggingFace: h("div", { class: "source-fields", dataset: { kind: "HuggingFace" } },
      field({ id: `${prefix}-hf-repo`, label: "Repository", path: `${prefix}.huggingface.repo_id`,
        control: inputs.repo_id, board }),
      field({ id: `${prefix}-hf-file`, label: "File", path: `${prefix}.huggingface.filename`,
        control: inputs.filename, hint: "A .gguf file in that repository.", board }),
      field({ id: `${prefix}-hf-revision`, label: "Revision", path: `${prefix}.huggingface.revision`,
        control: inputs.revision, hint: "Branch, tag or commit; main when empty.", board })),
    Url: h("div", { class: "source-fields", dataset: { kind: "Url" } },
      field({ id: `${prefix}-url`, label: "File URL", path: `${prefix}.url.url`, control: inputs.url,
        hint: "http(s):// or file:// address of a .gguf file.", board }),
      field({ id: `${prefix}-sha256`, label: "SHA-256", path: `${prefix}.url.sha256`, control: inputs.sha256,
        hint: "Agents check the download against it.", board })),
    LocalToAgent: h("div", { class: "source-fields", dataset: { kind: "LocalToAgent" } },
      field({ id: `${prefix}-path`, label: "Path on each agent", path: `${prefix}.local_path`,
        control: inputs.local_path, hint: "The file must exist on every agent of the group.", board })),
    None: h("div", { class: "source-fields", dataset: { kind: "None" } },
      h("p", { class: "muted" }, "Agents unload their model and serve nothing.")),
  };
  const radios = {};
  const sectionError = h("p", { class: "error", id: `${prefix}-error` });
  const fieldset = h("fieldset", { class: "source", "aria-describedby": sectionError.id },
    h("legend", { class: "visually-hidden" }, legend),
    h("div", { class: "source-options" }, SOURCE_KINDS.map(({ kind, label }) => {
      radios[kind] = h("input", { type: "radio", name, value: kind, onchange: () => sync() });
      return h("label", {}, radios[kind], label);
    })),
    Object.values(groups),
    sectionError);
  board.register(prefix, sectionError, null, legend);

  function kind() {
    return Object.keys(radios).find((k) => radios[k].checked) || "None";
  }
  function sync() {
    const k = kind();
    for (const [key, el] of Object.entries(groups)) el.hidden = key !== k;
  }
  return {
    el: h("div", {}, intro ? h("p", { class: "muted small" }, intro) : null, fieldset),
    set(source) {
      for (const input of Object.values(inputs)) input.value = "";
      let k = "None";
      if (source && typeof source === "object") {
        [k] = Object.keys(source);
        const v = source[k];
        if (k === "HuggingFace") {
          inputs.repo_id.value = v.repo_id || "";
          inputs.filename.value = v.filename || "";
          inputs.revision.value = v.revision || "main";
        } else if (k === "Url") {
          inputs.url.value = v.url || "";
          inputs.sha256.value = v.sha256 || "";
        } else if (k === "LocalToAgent") {
          inputs.local_path.value = v;
        }
      }
      (radios[k] || radios.None).checked = true;
      sync();
    },
    get() {
      const k = kind();
      if (k === "HuggingFace") {
        return { HuggingFace: {
          repo_id: inputs.repo_id.value.trim(), filename: inputs.filename.value.trim(),
          revision: inputs.revision.value.trim() || "main",
        } };
      }
      if (k === "Url") {
        const url = { url: inputs.url.value.trim() };
        if (inputs.sha256.value.trim()) url.sha256 = inputs.sha256.value.trim();
        return { Url: url };
      }
      if (k === "LocalToAgent") return { LocalToAgent: inputs.local_path.value.trim() };
      return "None";
    },
  };
}

function formatDefault(value) {
  if (typeof value === "boolean") return value ? "on" : "off";
  return String(value);
}

function rangeText(p) {
  const lo = p.minimum ?? p.exclusiveMinimum;
  const hi = p.maximum ?? p.exclusiveMaximum;
  if (lo !== undefined && hi !== undefined) return `${p.exclusiveMinimum !== undefined ? "above " : ""}${lo} to ${hi}`;
  if (lo !== undefined) return `${p.exclusiveMinimum !== undefined ? "above" : "at least"} ${lo}`;
  if (hi !== undefined) return `at most ${hi}`;
  return "";
}

function parameterEditor(params, board) {
  const controls = {};
  const sections = new Map();
  for (const p of params) {
    let control;
    if (p.type === "boolean") {
      control = h("input", { type: "checkbox" });
    } else if (p.type === "enum") {
      control = h("select", {}, p.choices.map((c) => h("option", { value: c }, c)));
    } else {
      control = h("input", { type: "number", step: p.type === "integer" ? "1" : "any", inputmode: "decimal" });
    }
    controls[p.name] = control;
    const range = rangeText(p);
    const hint = [p.help, range ? `Range: ${range}.` : ""].filter(Boolean).join(" ");
    const id = `param-${p.name}`;
    const reset = h("button", {
      type: "button", class: "small", "aria-label": `Reset ${p.label} to its default, ${formatDefault(p.default)}`,
      onclick: () => { setControl(control, p, p.default); control.focus(); },
    }, `default ${formatDefault(p.default)}`);
    let el;
    if (p.type === "boolean") {
      const error = h("p", { class: "error", id: `${id}-error`, dataset: { errorFor: `inference_parameters.${p.name}` } });
      const hintEl = h("p", { class: "hint", id: `${id}-hint` }, hint);
      control.id = id;
      control.dataset.path = `inference_parameters.${p.name}`;
      control.setAttribute("aria-describedby", `${hintEl.id} ${error.id}`);
      board.register(`inference_parameters.${p.name}`, error, control, p.label);
      el = h("div", { class: "field", dataset: { field: `inference_parameters.${p.name}` } },
        h("div", { class: "field-label" }, h("label", { class: "check", for: id }, control, p.label), reset),
        hintEl, error);
    } else {
      el = field({ id, label: p.label, path: `inference_parameters.${p.name}`, control, hint, extra: reset, board });
    }
    if (!sections.has(p.section)) sections.set(p.section, []);
    sections.get(p.section).push(el);
  }
  const el = h("div", {}, [...sections].map(([title, fields]) =>
    h("section", { class: "param-section", "aria-label": title }, h("h3", {}, title),
      h("div", { class: "param-grid" }, fields))));
  return {
    el,
    set(values) {
      for (const p of params) setControl(controls[p.name], p, values[p.name] ?? p.default);
    },
    get() {
      const out = {};
      for (const p of params) {
        const c = controls[p.name];
        if (p.type === "boolean") out[p.name] = c.checked;
        else if (p.type === "enum") out[p.name] = c.value;
        else out[p.name] = c.value.trim() === "" ? null : Number(c.value);
      }
      return out;
    },
  };
}

function setControl(control, p, value) {
  if (p.type === "boolean") control.checked = Boolean(value);
  else control.value = String(value);
}

function templateEditor(board) {
  const use = h("input", { type: "checkbox", id: "use-template-override" });
  const text = h("textarea", {
    rows: "16", spellcheck: "false", placeholder: "{% for message in messages %}…{% endfor %}",
  });
  const modelTemplate = h("pre", { class: "template-view placeholder", id: "model-template", tabindex: "0" },
    "Loading the model's own template…");
  const modelTemplateNote = h("p", { class: "hint", id: "model-template-note" }, "");
  const copy = h("button", { type: "button", class: "small", disabled: true, onclick: () => {
    text.value = modelTemplate.dataset.template || "";
    use.checked = true;
    text.focus();
  } }, "Copy into the editor");
  const useError = h("p", { class: "error", id: "use-template-override-error" });
  board.register("use_chat_template_override", useError, use, "Use a chat template override");
  const el = h("div", {},
    h("p", { class: "muted small" },
      "Agents format conversations with the chat template inside the model file. An override replaces it for "
      + "every agent of this group (Jinja, like the model's own)."),
    h("label", { class: "check" }, use, "Use a chat template override"),
    useError,
    h("div", { class: "template-columns" },
      field({ id: "template-override", label: "Override", path: "chat_template_override", control: text, board }),
      h("div", { class: "field" },
        h("div", { class: "field-label" }, h("span", { class: "label", id: "model-template-label" },
          h("strong", {}, "The model's own template")), copy),
        modelTemplate, modelTemplateNote)));
  modelTemplate.setAttribute("aria-labelledby", "model-template-label");
  return {
    el,
    set(state) {
      use.checked = Boolean(state.use_chat_template_override);
      text.value = (state.chat_template_override && state.chat_template_override.content) || "";
    },
    get() {
      const content = text.value;
      return {
        use_chat_template_override: use.checked,
        chat_template_override: content.trim() ? { content } : null,
      };
    },
    showModelTemplate(template, note) {
      modelTemplate.classList.toggle("placeholder", !template);
      modelTemplate.textContent = template || note;
      modelTemplate.dataset.template = template || "";
      modelTemplateNote.textContent = template ? note : "";
      copy.disabled = !template;
    },
  };
}

function ownerNotice(owner) {
  const match = /^ModelDeployment\/([^/]+)\/([^/]+)$/.exec(owner || "");
  const how = match
    ? h("p", {}, "Change the resource instead, for example ",
      h("code", {}, `kubectl edit modeldeployment ${match[2]} -n ${match[1]}`), ".")
    : h("p", {}, "Change it where it is managed.");
  return h("div", { class: "notice warn", id: "owner-notice", role: "note" },
    h("p", {}, h("strong", {}, "Read only. "), "This model group is managed by ", h("code", {}, owner),
      ": the operator would overwrite any edit made here."),
    how);
}

export async function mount(main, config) {
  const params = new URLSearchParams(window.location.search);
  let groupName = params.get("group") || config.default_model_group;
  let groups = [];
  let agents = [];
  let templateKey = null;

  const groupSelect = h("select", { id: "group-select" });
  const groupField = h("div", { class: "field" }, h("label", { for: "group-select" }, "Model group"), groupSelect);
  const noticeSlot = h("div", { id: "notice-slot" });
  const loadError = h("div", { id: "load-error" });
  const rolloutBody = h("tbody", { id: "rollout" });
  const rolloutEmpty = h("p", { class: "muted", id: "rollout-empty" }, "");
  const summary = h("div", { class: "error-summary", id: "error-summary" });
  const board = new ErrorBoard(summary);
  const model = sourceEditor("model", board, "Model source",
    "Where agents get the model file. They download it once and keep it in their cache.");
  const mmproj = sourceEditor("multimodal_projection", board, "Multimodal projection source",
    "A vision projector file for models that read images; None for text-only models.");
  const inference = parameterEditor(config.inference_parameters, board);
  const template = templateEditor(board);
  const saveStatus = h("span", { class: "save-status", id: "save-status", role: "status", "aria-live": "polite" });
  const saveButton = h("button", { type: "submit", class: "primary", id: "save" }, "Save desired state");
  const discardButton = h("button", { type: "button", id: "discard", onclick: () => loadGroup(groupName) },
    "Discard changes");
  const fields = h("fieldset", { id: "state-fields" },
    h("legend", { class: "visually-hidden" }, "Desired state"),
    h("section", { class: "panel", id: "model-source", "aria-labelledby": "source-title" },
      h("h2", { id: "source-title" }, "Model source"), model.el),
    h("section", { class: "panel", "aria-labelledby": "params-title" },
      h("div", { class: "panel-header" }, h("h2", { id: "params-title" }, "Inference parameters"),
        h("button", { type: "button", class: "small", id: "reset-all", onclick: () => inference.set({}) },
          "Reset all to defaults")),
      inference.el),
    h("section", { class: "panel", "aria-labelledby": "template-title" },
      h("h2", { id: "template-title" }, "Chat template"), template.el),
    h("details", { class: "panel", id: "mmproj-source" }, h("summary", {}, "Multimodal projection"), mmproj.el),
    h("div", { class: "form-actions" }, summary, saveButton, discardButton, saveStatus));
  const form = h("form", { id: "state-form", novalidate: true, "aria-label": "Desired state" }, fields);

  main.append(
    h("div", { class: "page-header" },
      h("div", {},
        h("h1", {}, "Model"),
        h("p", { class: "lead" },
          "The desired state of a model group: which model its agents serve and how. Saving pushes it to every "
          + "agent of the group at once."))),
    loadError,
    h("div", { class: "toolbar" }, groupField),
    noticeSlot,
    h("section", { class: "panel", "aria-labelledby": "rollout-title" },
      h("div", { class: "panel-header" }, h("h2", { id: "rollout-title" }, "Agents in this group"),
        h("span", { class: "muted small" }, "live")),
      h("table", { class: "rollout" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Agent"), h("th", { scope: "col" }, "Model"),
          h("th", { scope: "col" }, "State"), h("th", { scope: "col" }, "Slots"))),
        rolloutBody),
      rolloutEmpty),
    form,
  );

  // Edits not yet saved: say so, once, until the form is saved or reloaded.
  const markDirty = () => {
    if (form.dataset.dirty === "true") return;
    form.dataset.dirty = "true";
    if (saveStatus.dataset.tone !== "bad") {
      saveStatus.textContent = "Unsaved changes.";
      saveStatus.dataset.tone = "";
    }
  };
  form.addEventListener("input", markDirty);
  form.addEventListener("change", markDirty);
  form.addEventListener("click", (event) => {
    if (event.target instanceof HTMLButtonElement && event.target.type === "button"
      && event.target.id !== "discard") markDirty();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      model: model.get(),
      multimodal_projection: mmproj.get(),
      inference_parameters: inference.get(),
      ...template.get(),
    };
    board.clear();
    saveStatus.textContent = "Saving…";
    saveStatus.dataset.tone = "";
    saveButton.disabled = true;
    try {
      await api(config.management_url, `/api/v1/model_groups/${encodeURIComponent(groupName)}/desired_state`,
        { method: "PUT", body });
      saveStatus.textContent = `Saved. Agents in “${groupName}” are applying it.`;
      saveStatus.dataset.tone = "ok";
      form.dataset.dirty = "false";
      await refreshGroups();
    } catch (err) {
      saveStatus.dataset.tone = "bad";
      if (err instanceof ApiError && err.status === 400) {
        saveStatus.textContent = "Not saved: see the fields marked below.";
        board.show(err.message);
      } else {
        saveStatus.textContent = `Not saved: ${err.message}`;
      }
    } finally {
      saveButton.disabled = false;
    }
  });

  groupSelect.addEventListener("change", () => {
    groupName = groupSelect.value;
    const url = new URL(window.location.href);
    url.searchParams.set("group", groupName);
    window.history.replaceState(null, "", url);
    loadGroup(groupName);
  });

  function groupNames() {
    const names = new Set(groups.map((g) => g.name));
    for (const a of agents) names.add(a.model_group);
    names.add(config.default_model_group);
    return [...names].sort();
  }

  function renderGroupSelect() {
    const names = groupNames();
    const current = [...groupSelect.options].map((o) => o.value).join("\n");
    if (current !== names.join("\n")) {
      groupSelect.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
    }
    groupSelect.value = groupName;
  }

  async function refreshGroups() {
    const body = await api(config.management_url, "/api/v1/model_groups");
    groups = body.model_groups || [];
    renderGroupSelect();
    renderOwner();
  }

  function renderOwner() {
    const entry = groups.find((g) => g.name === groupName);
    const owner = entry ? entry.owner : null;
    noticeSlot.replaceChildren(owner ? ownerNotice(owner) : "");
    fields.disabled = Boolean(owner);
    form.dataset.readonly = owner ? "true" : "false";
  }

  function loadGroup(name) {
    const entry = groups.find((g) => g.name === name);
    const state = entry ? entry.desired_state : config.default_desired_state;
    board.clear();
    saveStatus.textContent = entry ? "" : "This group has no desired state yet; it starts from the defaults.";
    saveStatus.dataset.tone = "";
    form.dataset.dirty = "false";
    model.set(state.model);
    mmproj.set(state.multimodal_projection);
    inference.set(state.inference_parameters || {});
    template.set(state);
    renderOwner();
    renderRollout();
    templateKey = null;
    refreshModelTemplate();
  }

  function renderRollout() {
    const members = agents.filter((a) => a.model_group === groupName);
    rolloutBody.replaceChildren(...members.map((a) => {
      const s = agentStateWords(a);
      return h("tr", { dataset: { agentId: a.id } },
        h("td", {}, a.name || a.id),
        h("td", { class: "rollout-model", title: a.model_path || "" }, modelLabel(a.model_path)),
        h("td", {}, h("span", { class: "status", dataset: { tone: s.tone } },
          h("span", { class: "dot", "aria-hidden": "true" }), s.text)),
        h("td", {}, a.slots_total ? `${a.slots_in_flight} / ${a.slots_total}` : h("span", { class: "muted" }, "none open")));
    }));
    rolloutEmpty.textContent = members.length ? ""
      : `No agent serves “${groupName}” yet. Start one with --model-group ${groupName}.`;
    rolloutEmpty.hidden = members.length > 0;
  }

  async function refreshModelTemplate() {
    const members = agents.filter((a) => a.model_group === groupName);
    const loaded = members.filter((a) => a.model_path);
    const key = loaded.length ? loaded.map((a) => `${a.id}|${a.model_path}`).join(",") : `none|${members.length > 0}`;
    if (key === templateKey) return;
    templateKey = key;
    if (!loaded.length) {
      template.showModelTemplate(null, members.length
        ? "No agent of this group has a model loaded yet."
        : "No agent of this group is connected, so the model's template is not known.");
      return;
    }
    // Ask a few agents: one may be mid-swap, or run an engine without templates.
    let lastError = null;
    for (const agent of loaded.slice(0, 4)) {
      try {
        const body = await api(config.management_url,
          `/api/v1/agent/${encodeURIComponent(agent.id)}/model_metadata`);
        if (templateKey !== key) return;
        const text = ((body && body.metadata) || {})["tokenizer.chat_template"];
        if (text) {
          template.showModelTemplate(text, `From ${agent.model_path} on ${agent.name || agent.id}.`);
          return;
        }
      } catch (err) {
        lastError = err;
      }
    }
    if (templateKey !== key) return;
    template.showModelTemplate(null, lastError
      ? `Could not read the model's metadata: ${lastError.message}`
      : `The model ${loaded[0].model_path} has no chat template of its own.`);
    if (lastError) templateKey = null;
  }

  try {
    await refreshGroups();
  } catch (err) {
    loadError.replaceChildren(h("div", { class: "notice error", role: "alert" }, h("p", {}, err.message)));
  }
  loadGroup(groupName);
  onAgents(config, (list) => {
    agents = list;
    renderGroupSelect();
    renderRollout();
    refreshModelTemplate();
  });
}
