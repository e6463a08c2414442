// Calls to the /v1 API with the key as a Bearer header, and the job event stream.
//
// EventSource cannot send an Authorization header, so the stream is read with fetch()
// and parsed here: the same rules as EventSource (remember the id of the last
// *dispatched* event, resume with Last-Event-ID), so reconnecting never loses or
// repeats an event.

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
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        // Per-connection parser state: a half-received event is dropped with the connection.
        let buf = "";
        let data = [];
        let eventName = "";
        let idBuffer = lastId;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          const lines = buf.split(/\r?\n/);
          buf = lines.pop(); // an unfinished line waits for the next chunk
          for (const line of lines) {
            if (line === "") {
              lastId = idBuffer; // dispatch: only now does the event count as received
              if (data.length) {
                const payload = JSON.parse(data.join("\n"));
                delivered = true;
                failures = 0;
                if (eventName === "end") {
                  onState("ended");
                  onEnd(payload);
                  return;
                }
                if (eventName === "") onEvent(payload);
              }
              data = [];
              eventName = "";
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
            else if (field === "retry" && /^\d+$/.test(val)) retryMs = Number(val);
          }
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

async function apiError(resp) {
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
