// Entry point: picks the page by path and mounts it into <main>.

import { getConfig, setConnection } from "./api.js";
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
  const { mount } = await import(page.module);
  main.replaceChildren();
  await mount(main, config);
  main.dataset.ready = "true";
}

start();
