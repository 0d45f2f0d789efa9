// One live stream of the agents list for the whole page, shared by every view;
// it also drives the connection indicator in the top bar.

import { setConnection, subscribe } from "./api.js";

const listeners = new Set();
let latest = null;
let started = false;

export function onAgents(config, listener) {
  listeners.add(listener);
  if (latest !== null) listener(latest);
  if (!started) {
    started = true;
    subscribe(
      `${config.management_url}/api/v1/agents/stream`,
      (body) => {
        latest = body.agents || [];
        for (const fn of listeners) fn(latest);
      },
      (state) => setConnection(state, state === "live" ? "Live" : "Reconnecting…"),
    );
  }
  return () => listeners.delete(listener);
}
