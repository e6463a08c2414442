// Live line charts (uPlot, vendored under vendor/uplot) of metrics against the step.

export function formatBytes(n) {
  if (n == null || !isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  if (i === 0 || Number.isInteger(n)) return `${n} ${units[i]}`;
  return `${n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

// Steps are whole numbers: never put an axis tick at 1.5.
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 1e6];

// Memory ticks at round binary sizes (100 MiB, 2 GiB), not at 190.7 MiB.
export const BYTE_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500].flatMap((m) => [m, m * 2 ** 10, m * 2 ** 20, m * 2 ** 30])
  .sort((a, b) => a - b);

export class LineChart {
  // series: [{label, stroke, points?}], yFormat: (value) => string
  constructor(el, { series, yFormat = (v) => String(v), yLabel = "", yFromZero = false, yIncrements }) {
    this.el = el;
    this.series = series;
    this.steps = [];
    this.values = series.map(() => []);
    this.pending = false;
    const fmt = (u, ticks) => ticks.map((v) => (v == null ? "" : yFormat(v)));
    this.plot = new uPlot({
      ...this.size(),
      scales: {
        x: { time: false },
        y: yFromZero ? { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } : {},
      },
      cursor: { drag: { x: true, y: false } },
      legend: { live: true },
      series: [
        { label: "step", value: (u, v) => (v == null ? "–" : String(v)) },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.stroke,
          width: 2,
          spanGaps: true, // validation loss exists only at some steps
          // uPlot shows points by itself while they are sparse; validation loss always shows them
          points: s.points ? { show: true, size: 6, fill: s.stroke } : { size: 5, fill: s.stroke },
          value: (u, v) => (v == null ? "–" : yFormat(v)),
        })),
      ],
      axes: [
        { label: "step", stroke: "#555", incrs: STEP_INCREMENTS },
        { label: yLabel, stroke: "#555", values: fmt, size: 70, ...(yIncrements ? { incrs: yIncrements } : {}) },
      ],
    }, this.data(), el);
    this.el.dataset.points = "0";
    this.observer = new ResizeObserver(() => this.plot.setSize(this.size()));
    this.observer.observe(el);
  }

  size() {
    return { width: Math.max(this.el.clientWidth, 200), height: 220 };
  }

  data() {
    return [this.steps, ...this.values];
  }

  // One point per step; a repeated step (a resumed job re-runs steps) replaces the old one.
  add(step, values) {
    let i = this.steps.length;
    if (i && step <= this.steps[i - 1]) {
      i = this.steps.findIndex((s) => s >= step);
      if (this.steps[i] !== step) {
        this.steps.splice(i, 0, step);
        this.values.forEach((vs) => vs.splice(i, 0, null));
      }
    } else {
      this.steps.push(step);
      this.values.forEach((vs) => vs.push(null));
    }
    values.forEach((v, k) => { if (v != null) this.values[k][i] = v; });
    this.el.dataset.points = String(this.steps.length);
    this.schedule();
  }

  reset() {
    this.steps = [];
    this.values = this.series.map(() => []);
    this.el.dataset.points = "0";
    this.plot.setData(this.data());
  }

  // Replaying a long history adds hundreds of points at once: redraw once per frame.
  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.plot.setData(this.data());
    });
  }
}

// Validation loss against the target's position in its window (buckets "0-1K", "1K-4K", …):
// the starting model (step 0) and the latest validation, one line each. A late bucket
// falling below the start is what shows a long-document adapter using its context.
export class BucketChart {
  constructor(el, { yFormat = (v) => v.toFixed(3) } = {}) {
    this.el = el;
    this.names = [];
    const bucket = (v) => (v == null ? "–" : this.names[Math.round(v)] ?? "");
    this.plot = new uPlot({
      width: Math.max(el.clientWidth, 200),
      height: 220,
      scales: { x: { time: false, range: () => [-0.5, Math.max(this.names.length, 1) - 0.5] } },
      legend: { live: true },
      series: [
        { label: "position", value: (u, v) => bucket(v) },
        ...[["starting model", "#64748b"], ["latest", "#ea580c"]].map(([label, stroke]) => ({
          label,
          stroke,
          width: 2,
          points: { show: true, size: 7, fill: stroke },
          value: (u, v) => (v == null ? "–" : yFormat(v)),
        })),
      ],
      axes: [
        { label: "target position in the window (tokens)", stroke: "#555", incrs: [1], values: (u, ts) => ts.map(bucket) },
        { label: "loss", stroke: "#555", size: 70, values: (u, ts) => ts.map((v) => (v == null ? "" : yFormat(v))) },
      ],
    }, [[], [], []], el);
    this.el.dataset.buckets = "0";
    this.observer = new ResizeObserver(() => this.plot.setSize({ width: Math.max(el.clientWidth, 200), height: 220 }));
    this.observer.observe(el);
  }

  // start, latest: {bucket name: loss} or null; buckets in the order the job reports them.
  set(start, latest) {
    const names = [...new Set([...Object.keys(start || {}), ...Object.keys(latest || {})])];
    this.names = names;
    const column = (losses) => names.map((n) => (losses && losses[n] != null ? losses[n] : null));
    this.plot.setData([names.map((_, i) => i), column(start), column(latest)]);
    this.el.dataset.buckets = String(names.length);
  }

  reset() {
    this.set(null, null);
  }
}
