// The playground of a succeeded job: one question to the fine-tuned model and to its base
// model, both answers streamed side by side (POST /v1/chat/completions, `stream: true`, with
// the page's key), so what the training changed shows on the same input. Greedy decoding
// (temperature 0): the two answers differ by the adapter, not by sampling.
// Answers are written with textContent, never as HTML: a model's output is untrusted text.

const $ = (id) => document.getElementById(id);

// The base model under a job's adapter: `model` itself, or the base of the fine-tuned model
// (`ft:{base}:{org}:{suffix}:{job}`) a job continued from.
export function baseModelOf(model) {
  return model.startsWith("ft:") ? model.split(":")[1] : model;
}

export class Playground {
  // `api()` gives the page's current Api (its key can change while the page is open).
  constructor(api) {
    this.api = api;
    this.job = null;
    this.asking = null; // AbortController of the answers being streamed
    $("playground-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.ask();
    });
  }

  // Called with the selected job whenever it is drawn: shown for a job with a fine-tuned model.
  show(job) {
    const usable = job && job.status === "succeeded" && !!job.fine_tuned_model;
    $("playground").hidden = !usable;
    if (!usable || (this.job && this.job.id === job.id)) return;
    this.reset();
    this.job = job;
    $("answer-tuned-model").textContent = job.fine_tuned_model;
    $("answer-base-model").textContent = baseModelOf(job.model);
  }

  // Another job was selected: stop what is streaming, clear the answers.
  reset() {
    if (this.asking) this.asking.abort();
    this.asking = null;
    this.job = null;
    for (const id of ["answer-tuned", "answer-base"]) setAnswer(id, "idle", "");
  }

  async ask() {
    const job = this.job;
    const question = $("playground-input").value.trim();
    if (!job || !question) return;
    if (this.asking) this.asking.abort();
    const asking = new AbortController();
    this.asking = asking;
    const maxTokens = Number($("playground-max-tokens").value) || undefined;
    const body = { messages: [{ role: "user", content: question }], temperature: 0, max_tokens: maxTokens };
    $("playground-ask").disabled = true;
    try {
      await Promise.all([
        this.answer("answer-tuned", { ...body, model: job.fine_tuned_model }, asking.signal),
        this.answer("answer-base", { ...body, model: baseModelOf(job.model) }, asking.signal),
      ]);
    } finally {
      if (this.asking === asking) $("playground-ask").disabled = false;
    }
  }

  async answer(id, body, signal) {
    setAnswer(id, "waiting", "");
    let text = "";
    try {
      await this.api().chat(body, {
        signal,
        onText: (piece) => {
          text += piece;
          setAnswer(id, "streaming", text);
        },
      });
      setAnswer(id, "done", text || "(an empty answer)");
    } catch (e) {
      if (signal.aborted) return;
      setAnswer(id, "error", text ? `${text}\n\n[${e.message}]` : e.message);
    }
  }
}

function setAnswer(id, state, text) {
  const node = $(id);
  node.dataset.state = state;
  node.textContent = state === "waiting" ? "…" : text;
}
