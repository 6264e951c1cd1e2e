// The playground streams its answer while it is generated. It posts the
// same form (with its CSRF token) to /playground/stream and reads the NDJSON
// lines as they come: {"delta"} appends text, {"done", ...} ends with the
// model, tokens and timing, {"error"} shows what went wrong. Without this
// script the form posts to /playground and the page shows the whole answer.
(function () {
  "use strict";
  const form = document.querySelector("form[data-stream]");
  if (!form || !window.fetch || !window.TextDecoder || !window.ReadableStream) return;
  const section = document.getElementById("answer");
  const text = section.querySelector(".answer");
  const meta = section.querySelector(".meta");
  const failure = document.getElementById("stream-error");
  const button = form.querySelector("button[type=submit]");
  const number = new Intl.NumberFormat("en-US");

  function describe(t) {
    const usage = t.usage || {};
    const worker = String(t.worker || "").slice(-8);
    return `${t.model} · ${number.format(usage.prompt_tokens || 0)} prompt + ` +
      `${number.format(usage.completion_tokens || 0)} completion tokens · ` +
      `${number.format(Math.round(t.latency_ms || 0))} ms · finish: ${t.finish_reason} · ` +
      `worker ${worker}`;
  }

  async function run() {
    const response = await fetch(form.dataset.stream, {
      method: "POST", body: new URLSearchParams(new FormData(form)), credentials: "same-origin",
      headers: { Accept: "application/x-ndjson" },
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(body && body.error ? body.error.message : `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 1);
        if (!line) continue;
        const event = JSON.parse(line);
        if (typeof event.delta === "string") {
          text.textContent += event.delta;
        } else if (event.error) {
          throw new Error(event.error.message);
        } else if (event.done) {
          meta.textContent = describe(event);
        }
      }
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    failure.hidden = true;
    text.textContent = "";
    meta.textContent = "generating…";
    section.hidden = false;
    section.setAttribute("aria-busy", "true");
    try {
      await run();
    } catch (err) {
      failure.textContent = err.message;
      failure.hidden = false;
      meta.textContent = "";
    } finally {
      button.disabled = false;
      section.removeAttribute("aria-busy");
    }
  });
})();
