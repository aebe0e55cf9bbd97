// The web view's script: live updates over server-sent events, and the rule graph.
// A change in the index re-fetches the part of the page that shows it (rendered on the server).
"use strict";

function reactiveGraph() {
  const pre = document.querySelector("#graph pre.mermaid");
  if (!pre || typeof mermaid === "undefined") return;
  mermaid.initialize({ startOnLoad: false, securityLevel: "strict", theme: "default", flowchart: { useMaxWidth: true } });
  mermaid.run({ nodes: [pre] }).then(() => { document.body.dataset.graph = "drawn"; });
}

(function () {
  const target = document.querySelector("[data-live]");
  const badge = document.getElementById("live");
  if (!target || typeof EventSource === "undefined") { if (badge) badge.textContent = ""; return; }
  const kind = target.dataset.live;
  const key = target.dataset.key || "";
  let busy = false, again = false;

  function fragmentUrl() {
    const url = new URL(window.location.href);
    url.searchParams.delete("msg");
    if (kind !== "page") url.searchParams.set("fragment", "1");
    return url.toString();
  }

  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const response = await fetch(fragmentUrl(), { headers: { "Accept": "text/html" } });
      if (response.ok) {
        const html = await response.text();
        if (kind === "page") {
          const doc = new DOMParser().parseFromString(html, "text/html");
          const fresh = doc.getElementById(target.id);
          if (fresh) target.innerHTML = fresh.innerHTML;
        } else {
          target.innerHTML = html;
          if (kind === "execution") reactiveGraph();
        }
        document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
      }
    } finally {
      busy = false;
      if (again) { again = false; refresh(); }
    }
  }

  const query = new URLSearchParams({ since: target.dataset.since || "0" });
  if (key) query.set("key", key);
  const source = new EventSource("/events?" + query.toString());
  source.addEventListener("ready", () => { badge.textContent = "● live"; badge.className = "live on"; });
  source.addEventListener("changed", refresh);
  source.onerror = () => { badge.textContent = "○ reconnecting"; badge.className = "live"; };
})();
