// Calls to the /v1 API with the key as a Bearer header, and the job event stream.
//
// EventSource cannot send an Authorization header (nor POST a body, as a streamed chat
// completion needs), so streams are read with fetch() and parsed here (`readSSE`): the same
// rules as EventSource (remember the id of the last *dispatched* event, resume with
// Last-Event-ID), so reconnecting never loses or repeats an event.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class Api {
  constructor(key) {
    this.key = key;
  }

  headers(extra = {}) {
    return { Authorization: `Bearer ${this.key}`, ...extra };
  }

  async request(method, path, { signal } = {}) {
    let resp;
    try {
      resp = await fetch(`/v1${path}`, { method, headers: this.headers(), signal, cache: "no-store" });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "cannot reach the server");
    }
    if (!resp.ok) throw await apiError(resp);
    return resp.json();
  }

  get(path, opts) { return this.request("GET", path, opts); }
  post(path, opts) { return this.request("POST", path, opts); }

  // The adapter as a Blob (fetched with the header; the page then offers it via a blob: URL).
  async adapter(jobId) {
    const resp = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/adapter`, {
      headers: this.headers(), cache: "no-store",
    });
    if (!resp.ok) throw await apiError(resp);
    return resp.blob();
  }

  // A chat completion, streamed: onText(piece) for each piece of the answer as it comes, until
  // the server's `data: [DONE]` (OpenAI's chunk stream). An error (before or during the answer)
  // is thrown as an ApiError with the server's message.
  async chat(body, { onText, signal }) {
    let resp;
    try {
      resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: this.headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify({ ...body, stream: true }),
        signal,
        cache: "no-store",
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "cannot reach the server");
    }
    if (!resp.ok) throw await apiError(resp);
    for await (const msg of readSSE(resp.body)) {
      if (msg.data == null) continue;
      if (msg.data.trim() === "[DONE]") return;
      const chunk = JSON.parse(msg.data);
      if (chunk.error) throw new ApiError(resp.status, chunk.error.message || "the answer failed");
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (typeof piece === "string" && piece) onText(piece);
      }
    }
    throw new ApiError(0, "the answer was cut off before its end");
  }

  // Follow a job's events until the job ends (onEnd) or `signal` aborts.
  // onEvent(event) gets every event once, oldest first; onState("live" | "reconnecting" | "ended" | "error").
  async followEvents(jobId, { onEvent, onEnd, onState, signal }) {
    const url = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events/stream`;
    let lastId = null;
    let retryMs = 2000;
    let failures = 0;
    while (!signal.aborted) {
      let delivered = false;
      try {
        const headers = this.headers({ Accept: "text/event-stream" });
        if (lastId) headers["Last-Event-ID"] = lastId;
        const resp = await fetch(url, { headers, signal, cache: "no-store" });
        if (!resp.ok && resp.status < 500) {
          onState("error", (await apiError(resp)).message);
          return; // a bad key or an unknown job: retrying cannot help
        }
        if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
        onState("live");
        for await (const msg of readSSE(resp.body, lastId)) {
          if (msg.retry != null) { retryMs = msg.retry; continue; }
          lastId = msg.id; // dispatched: only now does the event count as received
          if (msg.data == null) continue;
          const payload = JSON.parse(msg.data);
          delivered = true;
          failures = 0;
          if (msg.event === "end") {
            onState("ended");
            onEnd(payload);
            return;
          }
          if (msg.event === "") onEvent(payload);
        }
      } catch (e) {
        if (signal.aborted) return;
      }
      onState("reconnecting");
      const delay = delivered ? 0 : Math.min(retryMs * ++failures, 10000);
      await sleep(delay, signal);
    }
  }
}

// The Server-Sent Events of a fetch() response body, by the EventSource rules: yields
// {event, data, id} as each event is dispatched (a blank line; `data` null when it had no data
// line, `id` the last id seen, from `lastId` on: what a reconnect resumes after) and {retry}
// for a reconnection delay. Per connection: a half-received event ends with it.
export async function* readSSE(body, lastId = null) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let data = [];
  let eventName = "";
  let idBuffer = lastId;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    const lines = buf.split(/\r?\n/);
    buf = lines.pop(); // an unfinished line waits for the next chunk
    for (const line of lines) {
      if (line === "") {
        const message = { event: eventName, data: data.length ? data.join("\n") : null, id: idBuffer };
        data = [];
        eventName = "";
        yield message;
        continue;
      }
      if (line.startsWith(":")) continue; // keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? "" : line.slice(colon + 1);
      if (val.startsWith(" ")) val = val.slice(1);
      if (field === "data") data.push(val);
      else if (field === "event") eventName = val;
      else if (field === "id" && !val.includes("\0")) idBuffer = val;
      else if (field === "retry" && /^\d+$/.test(val)) yield { retry: Number(val) };
    }
  }
}

export async function apiError(resp) {
  let message = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  return new ApiError(resp.status, message);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}
