// Entry point: picks the page by path and mounts it into <main>.

import { accepts, credential, getConfig, saveCredential, setConnection } from "./api.js";
import { h } from "./dom.js";

const PAGES = {
  "/": { name: "dashboard", title: "Dashboard", module: "./dashboard.js" },
  "/model": { name: "model", title: "Model", module: "./model.js" },
  "/prompt": { name: "prompt", title: "Prompt", module: "./prompt.js" },
};

async function start() {
  const path = window.location.pathname.replace(/\/+$/, "") || "/";
  const page = PAGES[path] || PAGES["/"];
  document.title = `${page.title} · Paddler admin`;
  for (const link of document.querySelectorAll(".nav a")) {
    if (link.dataset.page === page.name) link.setAttribute("aria-current", "page");
  }
  const main = document.getElementById("main");
  main.dataset.page = page.name;
  let config;
  try {
    config = await getConfig();
  } catch (err) {
    setConnection("down", "Offline");
    main.replaceChildren(
      h("div", { class: "notice error", role: "alert" },
        h("p", {}, h("strong", {}, "The admin panel could not load its configuration.")),
        h("p", {}, String(err.message || err))),
    );
    return;
  }
  showReplica(config);
  const refused = await refusedCredentials(config, page.name === "prompt");
  if (refused.length) {
    setConnection("down", "Sign in");
    main.replaceChildren(signIn(refused));
    main.dataset.ready = "true";
    return;
  }
  const { mount } = await import(page.module);
  main.replaceChildren();
  await mount(main, config);
  main.dataset.ready = "true";
}

// Several balancer replicas may serve one pool: say which one this panel shows.
function showReplica(config) {
  const badge = document.getElementById("replica");
  if (!badge || !config.replica_name) return;
  badge.textContent = `replica ${config.replica_name}`;
  badge.hidden = false;
}

const CREDENTIALS = {
  management: {
    label: "Management token",
    hint: "The balancer's --management-token (in Kubernetes: the pool's <pool>-management-token Secret).",
    id: "management-token",
  },
  inference: {
    label: "API key",
    hint: "The balancer's --api-key: the prompt page sends it to the inference API.",
    id: "api-key",
  },
};

/** The credentials this page needs that are missing or that the balancer refuses. */
async function refusedCredentials(config, needsInference) {
  const refused = [];
  if (config.management_token_required) {
    const ok = await accepts(`${config.management_url}/api/v1/agents`, credential("management")).catch(() => true);
    if (!ok) refused.push("management");
  }
  if (needsInference && config.api_key_required) {
    const ok = await accepts(`${config.inference_url}/v1/models`, credential("inference")).catch(() => true);
    if (!ok) refused.push("inference");
  }
  return refused;
}

function signIn(kinds) {
  const inputs = {};
  const fields = kinds.map((kind) => {
    const { label, hint, id } = CREDENTIALS[kind];
    inputs[kind] = h("input", { type: "password", id, name: id, autocomplete: "off", required: true });
    return h("div", { class: "field" }, h("label", { for: id }, label), inputs[kind],
      h("p", { class: "hint" }, hint));
  });
  const retried = kinds.some((kind) => credential(kind));
  return h("form", {
    class: "panel sign-in", id: "sign-in", "aria-labelledby": "sign-in-title",
    onsubmit: (event) => {
      event.preventDefault();
      for (const kind of kinds) saveCredential(kind, inputs[kind].value.trim());
      window.location.reload();
    },
  },
  h("h1", { id: "sign-in-title" }, "Sign in"),
  h("p", { class: "lead" }, "This balancer requires credentials. They stay in this browser tab only."),
  retried ? h("p", { class: "notice error", role: "alert" }, "The balancer refused what was entered; try again.") : null,
  fields,
  h("button", { type: "submit", class: "primary" }, "Sign in"));
}

start();
