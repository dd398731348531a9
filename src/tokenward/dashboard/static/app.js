// tokenward dashboard: progressive enhancement only; every page works without it.
"use strict";

// Copy buttons: data-copy="#element-id".
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  if (!source) return;
  const text = source.matches("ol, ul")
    ? Array.from(source.querySelectorAll("li")).map((li) => li.textContent.trim()).join("\n")
    : source.textContent.trim();
  const status = document.getElementById("copy-status");
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
    if (status) status.textContent = "Copied to the clipboard.";
  } catch (err) {
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    if (status) status.textContent = "Selected: press Ctrl+C (or Cmd+C) to copy.";
  }
});

// Confirmation for destructive forms: data-confirm="question".
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
  }
});

// Live tail of the audit log: polls the feed for entries newer than the newest shown.
(function liveTail() {
  const toggle = document.getElementById("live-tail");
  const body = document.querySelector("#trail tbody");
  if (!toggle || !body) return;
  // A position in the log (time, chain, seq), as the page and the feed give it.
  let after = toggle.dataset.after || "";
  let timer = null;
  const cell = (text, className) => {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  };
  async function poll() {
    const sep = toggle.dataset.feed.includes("?") ? "&" : "?";
    const response = await fetch(toggle.dataset.feed + sep + "after=" + encodeURIComponent(after), {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (!response.ok) return;
    const data = await response.json();
    for (const e of data.entries) {
      after = e.cursor; // the entries come oldest first
      const empty = body.querySelector("tr.empty");
      if (empty) empty.remove();
      const tr = document.createElement("tr");
      tr.className = "fresh" + (e.decision === "deny" ? " deny" : "");
      tr.dataset.cursor = e.cursor;
      tr.append(
        cell(e.at.replace("T", " ").slice(0, 19)),
        cell(e.action),
        cell(e.decision ? e.decision + " " + (e.reason || "") : e.severity || ""),
        cell(e.token_id || ""),
        cell(e.client_ip || ""),
        cell(Object.entries(e.detail || {}).map(([k, v]) => k + "=" + v).join(" "), "detail"),
      );
      body.prepend(tr);
    }
  }
  toggle.addEventListener("change", () => {
    if (toggle.checked) {
      poll();
      timer = setInterval(poll, 2000);
    } else if (timer) {
      clearInterval(timer);
    }
  });
})();
