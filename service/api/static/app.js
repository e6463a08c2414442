// The dashboard: job list (polled), and for the selected job its progress, live loss and
// memory charts, events and checkpoints. Every string from the server is written with
// textContent, never as HTML: messages can carry user-chosen text (file names, suffixes).

import { Api, ApiError } from "./api.js";
import { BYTE_INCREMENTS, BucketChart, LineChart, formatBytes } from "./charts.js";
import { Playground } from "./playground.js";

// The key is kept for this tab (sessionStorage) unless the user asks to remember it on this
// browser (localStorage): a key that outlives the tab is one more thing to leak.
const KEY_STORAGE = "seco.apiKey";
const JOBS_EVERY_MS = 3000;
const JOB_EVERY_MS = 2000;
const MAX_EVENT_ROWS = 400;
const ACTIVE = new Set(["validating_files", "queued", "running", "paused"]);

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children.filter((c) => c != null));
  return node;
};

const state = {
  api: null,
  jobs: [],
  selected: null, // job id
  job: null, // the selected job object
  stream: null, // AbortController of the selected job's event stream
  jobTimer: null,
  events: [],
  charts: null,
  playground: null, // the finished job's side-by-side questions (playground.js)
};

// ------------------------------------------------------------------ formatting

function age(ts) {
  if (!ts) return "–";
  const d = Math.max(0, Math.floor(Date.now() / 1000 - ts));
  if (d >= 86400) return `${Math.floor(d / 86400)}d`;
  if (d >= 3600) return `${Math.floor(d / 3600)}h`;
  if (d >= 60) return `${Math.floor(d / 60)}m`;
  return `${d}s`;
}

function duration(seconds) {
  if (seconds == null || seconds < 0) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(r).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

const time = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "–");
const dateTime = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "–");

function progressText(job) {
  if (job.status === "queued" && job.queue_position) return `#${job.queue_position} in queue`;
  if (job.progress == null) return "–";
  const pct = `${Math.round(job.progress * 100)}%`;
  return job.status === "running" && job.total_steps ? `${pct} (${job.step}/${job.total_steps})` : pct;
}

// `pending`: what a running job was asked to do next ("cancelling", "pausing"), shown in place of "running".
function badge(status, pending) {
  return el("span", { className: `badge ${status}`, textContent: pending || status.replace("_", " ") });
}

function pendingOf(job) {
  if (job.status !== "running") return null;
  if (job.cancel_requested) return "cancelling";
  return job.pause_requested ? "pausing" : null;
}

// ------------------------------------------------------------------ the key

function showKeyDialog(error) {
  const dialog = $("key-dialog");
  $("key-input").value = "";
  $("key-remember").checked = localStorage.getItem(KEY_STORAGE) !== null;
  $("key-error").hidden = !error;
  $("key-error").textContent = error || "";
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
}

function keepKey(key, remember) {
  sessionStorage.setItem(KEY_STORAGE, key);
  if (remember) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  localStorage.removeItem(KEY_STORAGE);
}

async function useKey(key, remember) {
  const api = new Api(key);
  try {
    await api.get("/models");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      showKeyDialog(e.message);
      return false;
    }
    setConn(false, e.message);
  }
  keepKey(key, remember);
  state.api = api;
  return true;
}

function setConn(ok, text) {
  const c = $("conn");
  c.className = `conn ${ok ? "ok" : "down"}`;
  c.textContent = ok ? "connected" : text || "disconnected";
}

// ------------------------------------------------------------------ job list

async function refreshJobs() {
  if (!state.api) return;
  try {
    const page = await state.api.get("/fine_tuning/jobs?limit=50");
    state.jobs = page.data;
    setConn(true);
    renderJobs();
    $("jobs-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) showKeyDialog(e.message);
    else setConn(false, e.message);
  }
}

function renderJobs() {
  const body = $("jobs").tBodies[0];
  body.replaceChildren(...state.jobs.map((job) => {
    const row = el("tr", { className: job.id === state.selected ? "selected" : "" },
      el("td", {}, el("a", { href: `#${job.id}`, textContent: job.id, className: "mono" })),
      el("td", { textContent: job.model }),
      el("td", {}, badge(job.status, pendingOf(job))),
      el("td", { textContent: progressText(job) }),
      el("td", { textContent: age(job.created_at), title: dateTime(job.created_at) }),
    );
    row.dataset.jobId = job.id;
    row.addEventListener("click", () => { location.hash = job.id; });
    return row;
  }));
  $("jobs-empty").hidden = state.jobs.length > 0;
}

// ------------------------------------------------------------------ one job

function makeCharts() {
  if (state.charts) return state.charts;
  state.charts = {
    loss: new LineChart($("loss-chart"), {
      series: [{ label: "training loss", stroke: "#2563eb" }, { label: "validation loss", stroke: "#ea580c", points: true }],
      yFormat: (v) => v.toFixed(3),
    }),
    memory: new LineChart($("mem-chart"), {
      series: [{ label: "peak memory", stroke: "#059669" }],
      yFormat: formatBytes,
      yIncrements: BYTE_INCREMENTS,
      yFromZero: true, // how much memory, not how it wobbles
    }),
    // DPO jobs: TRL's reward margin (train and held-out pairs) and the share of pairs ranked right
    rewards: new LineChart($("reward-chart"), {
      series: [
        { label: "reward margin", stroke: "#7c3aed" },
        { label: "validation margin", stroke: "#ea580c", points: true },
        { label: "reward accuracy", stroke: "#0891b2" },
      ],
      yFormat: (v) => v.toFixed(2),
    }),
    position: new BucketChart($("position-chart")), // loss by target position: see onPositionLoss
  };
  return state.charts;
}

function selectJob(jobId) {
  if (state.stream) state.stream.abort();
  clearInterval(state.jobTimer);
  state.selected = jobId;
  state.job = null;
  state.events = [];
  renderJobs();
  $("detail-empty").hidden = !!jobId;
  $("job").hidden = !jobId;
  if (!jobId || !state.api) return;
  const charts = makeCharts();
  charts.loss.reset();
  charts.memory.reset();
  charts.rewards.reset();
  $("reward-figure").hidden = true;
  resetPositionChart();
  state.playground.reset();
  $("events").replaceChildren();
  $("job-id").textContent = jobId;
  refreshJob();
  state.jobTimer = setInterval(refreshJob, JOB_EVERY_MS);
  const stream = new AbortController();
  state.stream = stream;
  state.api.followEvents(jobId, {
    signal: stream.signal,
    onEvent: (ev) => onEvent(jobId, ev),
    onEnd: () => { refreshJob(); refreshCheckpoints(jobId); },
    onState: (s, msg) => {
      $("stream-state").textContent = { live: "● live", reconnecting: "reconnecting…", ended: "", error: msg }[s];
    },
  });
}

async function refreshJob() {
  const jobId = state.selected;
  if (!jobId) return;
  try {
    const job = await state.api.get(`/fine_tuning/jobs/${encodeURIComponent(jobId)}`);
    if (jobId !== state.selected) return;
    const first = state.job == null;
    state.job = job;
    renderJob(job);
    const i = state.jobs.findIndex((j) => j.id === job.id);
    if (i >= 0) { state.jobs[i] = job; renderJobs(); } // keep its row in step with the detail
    if (first) refreshCheckpoints(jobId);
    if (!ACTIVE.has(job.status)) clearInterval(state.jobTimer);
  } catch (e) {
    $("job-error").hidden = false;
    $("job-error").textContent = e.message;
  }
}

function renderJob(job) {
  $("job-model").textContent = job.fine_tuned_model ? `${job.model} → ${job.fine_tuned_model}` : job.model;
  $("job-status").replaceWith(Object.assign(badge(job.status, pendingOf(job)),
    { id: "job-status" }));
  $("cancel").hidden = !ACTIVE.has(job.status) || job.cancel_requested;
  $("pause").hidden = !["validating_files", "queued", "running"].includes(job.status) || job.cancel_requested
    || job.pause_requested;
  $("resume").hidden = job.status !== "paused";
  $("download").hidden = job.status !== "succeeded";
  state.playground.show(job);
  const frac = job.status === "succeeded" ? 1 : job.progress || 0;
  $("progress-fill").style.width = `${(frac * 100).toFixed(1)}%`;
  $("progress-fill").className = `fill ${job.status}`;
  let text = progressText(job);
  if (job.status === "running" && job.estimated_finish) {
    text += ` · ETA ${duration(job.estimated_finish - Date.now() / 1000)}`;
  }
  $("progress-text").textContent = text;
  $("job-error").hidden = !job.error;
  $("job-error").textContent = job.error ? `${job.error.message} (${job.error.code})` : "";

  const seco = job.seco || {};
  const lora = seco.lora || {};
  const hp = job.hyperparameters || {};
  const dpo = job.method && job.method.type === "dpo";
  $("reward-figure").hidden = !dpo;
  const facts = [
    ["Created", dateTime(job.created_at)],
    ["Started", dateTime(job.started_at)],
    ["Finished", dateTime(job.finished_at)],
    ["Trained tokens", job.trained_tokens ? job.trained_tokens.toLocaleString() : "–"],
    ["Peak memory", formatBytes(job.peak_memory_bytes)],
    ["Method", dpo ? `DPO (β ${hp.beta ?? "auto"})` : "supervised"],
    ["Mode", seco.mode === "spaco" ? `SpaCO (budget ${seco.budget}, ${seco.sampling})` : "SeCO (exact)"],
    ["Chunk / window", `${seco.chunk_size ?? "auto"} / ${seco.max_length ?? "auto"} tokens`],
    ["LoRA", `r=${lora.r ?? "–"} α=${lora.alpha ?? "–"}`],
    ["Epochs / batch", `${hp.n_epochs ?? "auto"} / ${hp.batch_size ?? "auto"}`],
    ["Training file", job.training_file],
    ["Validation file", job.validation_file || "–"],
  ];
  $("facts").replaceChildren(...facts.map(([k, v]) => el("div", {},
    el("dt", { textContent: k }), el("dd", { textContent: v, title: v }))));
}

function onEvent(jobId, ev) {
  if (jobId !== state.selected) return;
  if (ev.type === "metrics" && ev.data && ev.data.step != null) {
    const d = ev.data;
    state.charts.loss.add(d.step, [d.train_loss ?? null, d.valid_loss ?? null]);
    if (d.peak_memory_bytes != null) state.charts.memory.add(d.step, [d.peak_memory_bytes]);
    if (d.reward_margin != null) {
      $("reward-figure").hidden = false;
      state.charts.rewards.add(d.step, [d.reward_margin, d.valid_reward_margin ?? null, d.reward_accuracy ?? null]);
    }
    onPositionLoss(d);
  }
  if (ev.type !== "metrics" && /checkpoint/i.test(ev.message)) refreshCheckpoints(jobId);
  addEventRow(ev);
}

// ------------------------------------------------------------------ loss by position

// Validation loss by target position: the starting model's (step 0, before training) and the
// latest validation's. Replaying the history on a reload arrives at the same two.
const positionLoss = { start: null, latest: null, latestStep: -1 };

function resetPositionChart() {
  Object.assign(positionLoss, { start: null, latest: null, latestStep: -1 });
  state.charts.position.reset();
  $("position-figure").hidden = true;
  $("position-chart").dataset.latestStep = "";
}

function onPositionLoss(d) {
  const losses = d.valid_loss_by_position;
  if (!losses || typeof losses !== "object") return;
  if (d.step === 0) positionLoss.start = losses;
  else if (d.step >= positionLoss.latestStep) Object.assign(positionLoss, { latest: losses, latestStep: d.step });
  $("position-figure").hidden = false;
  $("position-when").textContent = positionLoss.latest
    ? `starting model (step 0) and step ${positionLoss.latestStep}`
    : "starting model (step 0)";
  state.charts.position.set(positionLoss.start, positionLoss.latest);
  $("position-chart").dataset.latestStep = positionLoss.latest ? String(positionLoss.latestStep) : "";
}

function addEventRow(ev) {
  const list = $("events");
  const row = el("li", { className: `ev ${ev.type} ${ev.level}` },
    el("time", { textContent: time(ev.created_at), dateTime: new Date(ev.created_at * 1000).toISOString() }),
    el("span", { textContent: ev.message }));
  list.prepend(row); // newest first
  while (list.children.length > MAX_EVENT_ROWS) list.lastElementChild.remove();
}

async function refreshCheckpoints(jobId) {
  try {
    const page = await state.api.get(`/fine_tuning/jobs/${encodeURIComponent(jobId)}/checkpoints?limit=100`);
    if (jobId !== state.selected) return;
    const fmt = (v) => (typeof v === "number" ? v.toFixed(4) : "–");
    $("checkpoints").tBodies[0].replaceChildren(...page.data.map((c) => el("tr", {},
      el("td", { textContent: c.step_number }),
      el("td", { textContent: fmt(c.metrics.train_loss) }),
      el("td", { textContent: fmt(c.metrics.valid_loss) }),
      el("td", { textContent: time(c.created_at) }))));
    $("checkpoints-empty").hidden = page.data.length > 0;
  } catch (_) { /* shown by the next job refresh */ }
}

async function download() {
  const job = state.job;
  const button = $("download");
  button.disabled = true;
  button.textContent = "Downloading…";
  try {
    const blob = await state.api.adapter(job.id);
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: `${job.id}-adapter.tar.gz` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    button.textContent = `Downloaded (${formatBytes(blob.size)})`;
    button.dataset.bytes = String(blob.size);
  } catch (e) {
    button.textContent = "Download adapter";
    alert(`Download failed: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

async function cancel() {
  const job = state.job;
  if (!job || !confirm(`Cancel ${job.id}?`)) return;
  try {
    renderJob(await state.api.post(`/fine_tuning/jobs/${encodeURIComponent(job.id)}/cancel`));
  } catch (e) {
    alert(`Cancel failed: ${e.message}`);
  }
  refreshJobs();
}

// Pause (a running job stops after its current step, with a checkpoint) and resume (from it).
async function control(action) {
  const job = state.job;
  if (!job) return;
  try {
    renderJob(await state.api.post(`/fine_tuning/jobs/${encodeURIComponent(job.id)}/${action}`));
  } catch (e) {
    alert(`${action[0].toUpperCase()}${action.slice(1)} failed: ${e.message}`);
  }
  refreshJobs();
}

// ------------------------------------------------------------------ start

function fromHash() {
  const id = decodeURIComponent(location.hash.slice(1));
  selectJob(/^ftjob-[0-9a-f]+$/.test(id) ? id : null);
}

async function start() {
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    if (await useKey(key, $("key-remember").checked)) {
      $("key-dialog").close();
      await refreshJobs();
      fromHash();
    }
  });
  $("key-forget").addEventListener("click", () => {
    forgetKey();
    state.api = null;
    showKeyDialog();
  });
  $("change-key").addEventListener("click", () => showKeyDialog());
  $("download").addEventListener("click", download);
  $("cancel").addEventListener("click", cancel);
  $("pause").addEventListener("click", () => control("pause"));
  $("resume").addEventListener("click", () => control("resume"));
  state.playground = new Playground(() => state.api);
  $("show-steps").addEventListener("change", (e) => $("events").classList.toggle("show-steps", e.target.checked));
  window.addEventListener("hashchange", fromHash);
  setInterval(refreshJobs, JOBS_EVERY_MS);

  const remembered = localStorage.getItem(KEY_STORAGE);
  const saved = sessionStorage.getItem(KEY_STORAGE) || remembered;
  if (saved && (await useKey(saved, remembered === saved))) {
    await refreshJobs();
    fromHash();
  } else if (!saved) {
    showKeyDialog();
  }
}

start();
