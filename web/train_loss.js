// Train LoRA: a live loss curve inside the node, fed by the server's "musubi.train.progress"
// events ({node, prompt_id, client_id, step, loss, lrs}, one per optimizer step), and the run's
// messages (a new name taken, a resume, where Cancel stopped) from "musubi.train.status" events
// ({node, prompt_id, client_id, kind, text}), shown as lines of text under the curve, and the
// newest training samples from "musubi.train.samples" events ({node, prompt_id, client_id, step,
// images: [{filename, subfolder, type, label}]}: PNG stills, animated WebP videos), under it too.
// With Validation Data connected, "musubi.train.validation" events ({node, prompt_id, client_id,
// step, mean, bands, band_levels}) add the validation loss as a second line with a dot per
// evaluation, on the same axis as the training loss and its moving average.
//
// The server sends both only to the client that queued the prompt, and this tab draws only
// events of prompts it queued itself (the prompt ids that /prompt answered), each into the
// workflow it was queued from: a run never draws into another tab, nor into another open
// workflow whose Train LoRA has the same node id. A tab reloaded during a run picks its run up
// again: prompts of this tab's client id already in the queue when the page loaded count as its
// own. Without events (API runs) the widget only says it is waiting; the node's PNG plot covers
// that case.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "MusubiTrainLoRA";
const PROGRESS_EVENT = "musubi.train.progress";
const STATUS_EVENT = "musubi.train.status";
const SAMPLES_EVENT = "musubi.train.samples";
const VALIDATION_EVENT = "musubi.train.validation";
const VALIDATION_COLOR = "#6fd08c";
const SAMPLE_HEIGHT = 112; // pixels of one sample preview (the caption comes under it)
const LOSS_COLOR = "#7f9fcc";
const AVERAGE_COLOR = "#f0c04a";
const FONT = "11px sans-serif";
const ROW = 13; // pixels per header row
const HOLD_MS = 60_000; // how long events of a prompt not (yet) known to be ours are kept
const HOLD_EVENTS = 5_000;

const ownPrompts = new Map(); // prompt id → id of the workflow (root graph) it was queued from
const queuedAtLoad = new Map(); // prompt id → { client, workflow }: in the server's queue when the page loaded
const held = new Map(); // prompt id → { since, events }: events that came before /prompt answered
const runs = new Map(); // "workflow id|node id" → { prompt, steps, losses, sums, lrs, notes, noteKind }
const charts = new Set(); // { node, repaint } of every Train LoRA node on the canvas
let runningPrompt = null; // the prompt the server runs now, when this tab queued it

const runKey = (workflow, node) => `${workflow ?? ""}|${node}`;

function workflowIdOf(node) {
  const graph = node?.graph;
  return graph?.rootGraph?.id ?? graph?.id ?? app.graph?.id ?? "";
}

function chartKey(chart) {
  return runKey(workflowIdOf(chart.node), String(chart.node.id));
}

// The workflow a prompt of this tab was queued from; undefined: not (or not yet) known as ours.
function workflowOfPrompt(prompt) {
  if (ownPrompts.has(prompt)) return ownPrompts.get(prompt);
  const earlier = queuedAtLoad.get(prompt);
  if (earlier && api.clientId && earlier.client === api.clientId) return earlier.workflow;
  return undefined;
}

function newRun(key, prompt) {
  const run = { prompt, steps: [], losses: [], sums: [0], lrs: {}, notes: [], noteKind: "", samples: new Map(), validation: [] };
  runs.set(key, run);
  return run;
}

function repaint(key) {
  for (const chart of charts) if (chartKey(chart) === key) chart.repaint();
}

function record(kind, detail, workflow) {
  const key = runKey(workflow, String(detail.node));
  let run = runs.get(key);
  if (!run || run.prompt !== detail.prompt_id) run = newRun(key, detail.prompt_id); // a new prompt: a new chart
  if (kind === STATUS_EVENT) {
    run.notes = String(detail.text ?? "").split("\n").filter((line) => line.trim());
    run.noteKind = String(detail.kind ?? "");
  } else if (kind === VALIDATION_EVENT) {
    if (Number.isFinite(detail.step) && Number.isFinite(detail.mean)) {
      run.validation = run.validation.filter((point) => point.step < detail.step); // a re-run step replaces
      run.validation.push({ step: detail.step, mean: detail.mean });
    }
  } else if (kind === SAMPLES_EVENT) {
    for (const image of detail.images ?? []) run.samples.set(image.prompt ?? image.filename, image); // newest per prompt
  } else {
    const { step, loss, lrs } = detail;
    const last = run.steps[run.steps.length - 1];
    if (step <= last) {
      // steps going back within one prompt: start the curve again, keep the messages and samples
      const notes = run.notes, noteKind = run.noteKind, samples = run.samples;
      run = newRun(key, detail.prompt_id);
      Object.assign(run, { notes, noteKind, samples });
    }
    const value = Number.isFinite(loss) ? loss : NaN;
    run.steps.push(step);
    run.losses.push(value);
    run.sums.push(run.sums[run.sums.length - 1] + (Number.isFinite(value) ? value : 0));
    run.lrs = lrs ?? {};
  }
  repaint(key);
}

function onServerEvent(kind, detail) {
  if (!detail || detail.node == null || detail.prompt_id == null) return;
  if (detail.client_id && api.clientId && detail.client_id !== api.clientId) return; // not addressed to this tab
  const workflow = workflowOfPrompt(detail.prompt_id);
  if (workflow !== undefined) {
    record(kind, detail, workflow);
    return;
  }
  // The run may have started before /prompt answered this tab: keep its events a while.
  const now = Date.now();
  for (const [prompt, entry] of held) if (now - entry.since > HOLD_MS) held.delete(prompt);
  let entry = held.get(detail.prompt_id);
  if (!entry) held.set(detail.prompt_id, (entry = { since: now, events: [] }));
  if (entry.events.length < HOLD_EVENTS) entry.events.push([kind, detail]);
}

function adoptPrompt(prompt, workflow) {
  ownPrompts.set(prompt, workflow);
  if (ownPrompts.size > 500) ownPrompts.delete(ownPrompts.keys().next().value);
  const entry = held.get(prompt);
  held.delete(prompt);
  for (const [kind, detail] of entry?.events ?? []) record(kind, detail, workflow);
}

async function rememberQueueAtLoad() {
  try {
    const response = await api.fetchApi("/queue");
    const queue = await response.json();
    for (const item of [...(queue.queue_running ?? []), ...(queue.queue_pending ?? [])]) {
      const [, prompt, , extra] = item;
      if (prompt == null || !extra?.client_id) continue;
      queuedAtLoad.set(prompt, { client: extra.client_id, workflow: extra.extra_pnginfo?.workflow?.id ?? "" });
    }
  } catch {
    // no queue to pick up: only prompts queued from now on are drawn
  }
  for (const prompt of [...held.keys()]) {
    const workflow = workflowOfPrompt(prompt);
    if (workflow !== undefined) adoptPrompt(prompt, workflow);
  }
}

// Same window as the PNG plot: a tenth of the run, between 1 and 100 steps.
function averageWindow(count) {
  return Math.max(1, Math.min(100, Math.floor(count / 10)));
}

function average(run, index, size) {
  const start = Math.max(0, index + 1 - size);
  return (run.sums[index + 1] - run.sums[start]) / (index + 1 - start);
}

function formatNumber(value) {
  return Number.isFinite(value) ? value.toPrecision(4) : "–";
}

function formatRates(lrs) {
  const rates = [...new Set(Object.values(lrs).map((v) => Number(v).toExponential(2)))];
  return rates.length ? "lr " + rates.join(" / ") : "";
}

// The header labels placed so none overlaps another: the step/loss/average text on the left
// (its last parts dropped when even it alone is too wide), the loss range on the right, the
// learning rate after the left text. What does not fit in the first row goes to a second one
// (range right, lr left); the lr label is dropped when it fits nowhere.
export function layoutHeader(measure, width, { stats, range, lr }) {
  const gap = 12;
  const join = (parts) => parts.join("  ");
  const parts = [...stats];
  while (parts.length > 1 && measure(join(parts)) > width) parts.pop();
  const left = join(parts);
  const leftWidth = measure(left);
  const rangeWidth = measure(range);
  const lrWidth = lr ? measure(lr) : 0;
  const labels = [{ text: left, row: 0, align: "left" }];
  const withLr = lr ? `${left}  ${lr}` : left;
  if (measure(withLr) + gap + rangeWidth <= width) {
    labels[0].text = withLr;
    labels.push({ text: range, row: 0, align: "right" });
  } else if (leftWidth + gap + rangeWidth <= width) {
    labels.push({ text: range, row: 0, align: "right" });
    if (lr && lrWidth <= width) labels.push({ text: lr, row: 1, align: "left" });
  } else {
    if (rangeWidth <= width) labels.push({ text: range, row: 1, align: "right" });
    const rangeOnRow = rangeWidth <= width ? rangeWidth + gap : 0;
    if (lr && lrWidth + rangeOnRow <= width) labels.push({ text: lr, row: 1, align: "left" });
  }
  return { labels, rows: Math.max(...labels.map((label) => label.row)) + 1 };
}

function draw(canvas, run) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width < 10 || height < 10) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(0, 0, width, height);
  ctx.font = FONT;
  ctx.fillStyle = "#aaa";
  if (!run || run.steps.length === 0) {
    ctx.fillText("loss curve: waiting for training steps…", 8, 18);
    return;
  }

  const count = run.steps.length;
  const smoothing = averageWindow(count);
  const lastStep = run.steps[count - 1];
  let low = Infinity, high = -Infinity;
  const validation = run.validation ?? [];
  for (const value of [...run.losses, ...validation.map((point) => point.mean)]) {
    if (value < low) low = value;
    if (value > high) high = value;
  }
  if (low > high) [low, high] = [0, 1]; // no finite loss yet
  const lastAverage = average(run, count - 1, smoothing);
  const stats = [`step ${lastStep}`, `loss ${formatNumber(run.losses[count - 1])}`];
  if (smoothing > 1) stats.push(`avg${smoothing} ${formatNumber(lastAverage)}`);
  if (validation.length) stats.push(`val ${formatNumber(validation[validation.length - 1].mean)}`);
  const header = layoutHeader((text) => ctx.measureText(text).width, width - 14, {
    stats, range: `${formatNumber(high)} … ${formatNumber(low)}`, lr: formatRates(run.lrs),
  });

  const span = high - low || Math.abs(high) || 1;
  const keyRow = validation.length ? ROW : 0; // a row under the curve for the key of the lines
  const top = 6 + header.rows * ROW, bottom = height - 6 - keyRow, left = 6, right = width - 6;
  const firstStep = Math.min(run.steps[0], validation.length ? validation[0].step : Infinity);
  const x = (step) => left + ((step - firstStep) / Math.max(1, lastStep - firstStep)) * (right - left);
  const y = (loss) => bottom - ((loss - low) / span) * Math.max(1, bottom - top);
  const stride = Math.max(1, Math.floor(count / (right - left))); // about one point per pixel

  const line = (valueAt, color, widthPx) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = widthPx;
    ctx.beginPath();
    let pen = false;
    for (let i = 0; i < count; i += stride) {
      const value = valueAt(i);
      if (!Number.isFinite(value)) { pen = false; continue; }
      if (pen) ctx.lineTo(x(run.steps[i]), y(value));
      else ctx.moveTo(x(run.steps[i]), y(value));
      pen = true;
    }
    ctx.stroke();
  };
  line((i) => run.losses[i], LOSS_COLOR, 1);
  if (smoothing > 1) line((i) => average(run, i, smoothing), AVERAGE_COLOR, 2);
  if (count === 1 && Number.isFinite(run.losses[0])) {
    ctx.fillStyle = LOSS_COLOR;
    ctx.fillRect(x(run.steps[0]) - 2, y(run.losses[0]) - 2, 4, 4);
  }
  if (validation.length) {
    // the validation loss: a line through its evaluations, a dot at each, and a key in the corner
    ctx.strokeStyle = ctx.fillStyle = VALIDATION_COLOR;
    ctx.lineWidth = 2;
    ctx.beginPath();
    validation.forEach((point, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(point.step), y(point.mean)));
    ctx.stroke();
    for (const point of validation) {
      ctx.beginPath();
      ctx.arc(x(point.step), y(point.mean), 3, 0, 2 * Math.PI);
      ctx.fill();
    }
    const keys = [["loss", LOSS_COLOR], ...(smoothing > 1 ? [[`avg${smoothing}`, AVERAGE_COLOR]] : []), ["validation", VALIDATION_COLOR]];
    ctx.textAlign = "right";
    let end = right;
    for (const [text, color] of keys.reverse()) {
      ctx.fillStyle = color;
      ctx.fillText(text, end, height - 5);
      end -= ctx.measureText(text).width + 10;
    }
    ctx.textAlign = "left";
  }

  for (const label of header.labels) {
    ctx.fillStyle = label.align === "right" ? "#888" : "#ddd";
    ctx.textAlign = label.align;
    ctx.fillText(label.text, label.align === "right" ? right : 8, 14 + label.row * ROW);
  }
  ctx.textAlign = "left";
}

function showNotes(element, run) {
  const notes = run?.notes ?? [];
  const text = notes.join("\n");
  if (element.textContent === text && element.dataset.kind === (run?.noteKind ?? "")) return false;
  element.textContent = text;
  element.dataset.kind = run?.noteKind ?? "";
  element.style.display = notes.length ? "block" : "none";
  element.style.color = run?.noteKind === "stopped" ? AVERAGE_COLOR : "#ccc";
  return true;
}

// The newest sample of every prompt, each with its step under it; returns whether anything changed.
function showSamples(element, run) {
  const images = [...(run?.samples?.values() ?? [])];
  const wanted = images.map((image) =>
    api.apiURL(`/view?${new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type ?? "temp" })}`));
  if (element.dataset.shown === wanted.join("\n")) return false;
  element.dataset.shown = wanted.join("\n");
  element.replaceChildren(...images.map((image, index) => {
    const figure = document.createElement("figure");
    figure.className = "musubi-train-sample";
    figure.style.cssText = "margin:0;display:flex;flex-direction:column;align-items:center;min-width:0";
    const picture = document.createElement("img");
    picture.src = wanted[index];
    picture.alt = image.label ?? "";
    picture.title = image.label ?? "";
    picture.style.cssText = `height:${SAMPLE_HEIGHT}px;max-width:100%;object-fit:contain;border-radius:3px;background:#111`;
    const caption = document.createElement("figcaption");
    caption.textContent = image.label ?? `step ${image.step}`;
    caption.style.cssText = "font:11px sans-serif;color:#bbb;white-space:nowrap";
    figure.append(picture, caption);
    return figure;
  }));
  element.style.display = images.length ? "flex" : "none";
  return true;
}

app.registerExtension({
  name: "musubi.TrainLossCurve",
  setup() {
    api.addEventListener(PROGRESS_EVENT, (event) => onServerEvent(PROGRESS_EVENT, event?.detail));
    api.addEventListener(STATUS_EVENT, (event) => onServerEvent(STATUS_EVENT, event?.detail));
    api.addEventListener(SAMPLES_EVENT, (event) => onServerEvent(SAMPLES_EVENT, event?.detail));
    api.addEventListener(VALIDATION_EVENT, (event) => onServerEvent(VALIDATION_EVENT, event?.detail));
    // The prompt ids this tab queued, from /prompt's answers, with the workflow each came from.
    const queuePrompt = api.queuePrompt;
    api.queuePrompt = async function (number, data, ...rest) {
      const answer = await queuePrompt.call(this, number, data, ...rest);
      if (answer?.prompt_id != null) adoptPrompt(answer.prompt_id, data?.workflow?.id ?? app.graph?.id ?? "");
      return answer;
    };
    // A Train LoRA that starts executing in a new prompt of this tab starts a new chart.
    api.addEventListener("execution_start", (event) => {
      const prompt = event?.detail?.prompt_id;
      runningPrompt = prompt != null && workflowOfPrompt(prompt) !== undefined ? prompt : null;
    });
    api.addEventListener("executing", (event) => {
      if (runningPrompt == null || event?.detail == null) return;
      const key = runKey(workflowOfPrompt(runningPrompt), String(event.detail));
      if (runs.get(key)?.prompt === runningPrompt) return;
      if (![...charts].some((chart) => chartKey(chart) === key)) return;
      newRun(key, runningPrompt);
      repaint(key);
    });
    // The node's loss picture is for runs no chart drew (API scripts); where this tab drew the run
    // live, the picture would only repeat the chart under it, so it is not shown.
    api.addEventListener("executed", (event) => {
      const detail = event?.detail;
      if (!detail?.output?.images?.length || detail.prompt_id == null) return;
      const workflow = workflowOfPrompt(detail.prompt_id);
      if (workflow === undefined) return;
      const nodeId = String(detail.display_node ?? detail.node);
      const run = runs.get(runKey(workflow, nodeId));
      if (!run || run.prompt !== detail.prompt_id || !run.steps.length) return;
      const node = app.graph?.getNodeById(Number(nodeId));
      if (node?.type !== NODE_TYPE) return;
      const shown = app.nodeOutputs?.[nodeId];
      if (shown?.images) shown.images = [];
      detail.output.images = [];
      node.images = [];
      node.imgs = undefined;
      node.setDirtyCanvas?.(true, true);
    });
    rememberQueueAtLoad();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const box = document.createElement("div");
      box.style.cssText = "width:100%;height:100%;display:flex;flex-direction:column;gap:3px;min-height:0";
      const canvas = document.createElement("canvas");
      canvas.style.cssText = "flex:1 1 auto;min-height:0;width:100%;display:block;border-radius:4px";
      const notes = document.createElement("div");
      notes.className = "musubi-train-notes";
      notes.style.cssText =
        "display:none;flex:0 0 auto;max-height:6.2em;overflow:auto;font:11px/1.35 sans-serif;" +
        "white-space:pre-wrap;overflow-wrap:anywhere;user-select:text;padding:0 4px";
      const gallery = document.createElement("div");
      gallery.className = "musubi-train-samples";
      gallery.style.cssText = "display:none;flex:0 0 auto;flex-wrap:wrap;gap:4px;justify-content:center;overflow:hidden";
      box.append(canvas, gallery, notes);
      const widget = this.addDOMWidget("loss_curve", "musubi_loss_curve", box, {
        serialize: false,
        getMinHeight: () => 120 + (notes.style.display === "none" ? 0 : Math.min(notes.scrollHeight, 84) + 3) +
          (gallery.style.display === "none" ? 0 : Math.max(gallery.scrollHeight, SAMPLE_HEIGHT + 16) + 3),
      });
      widget.serialize = false; // a picture, not a value: keep widgets_values unchanged
      let pending = false;
      const node = this;
      const chart = {
        node,
        canvas,
        notes,
        repaint: () => {
          if (pending) return;
          pending = true;
          requestAnimationFrame(() => {
            pending = false;
            const run = runs.get(chartKey(chart));
            const samplesChanged = showSamples(gallery, run);
            if (showNotes(notes, run) || samplesChanged) {
              // messages came or went: let the node grow so the curve keeps its room
              const wanted = node.computeSize?.()[1];
              if (wanted && node.size[1] < wanted) node.setSize([node.size[0], wanted]);
              node.setDirtyCanvas?.(true, true);
            }
            draw(canvas, run);
          });
        },
      };
      charts.add(chart);
      const added = this.onAdded;
      this.onAdded = function () {
        charts.add(chart); // back after an undo
        return added?.apply(this, arguments);
      };
      const removed = this.onRemoved;
      this.onRemoved = function () {
        charts.delete(chart);
        return removed?.apply(this, arguments);
      };
      new ResizeObserver(chart.repaint).observe(canvas);
      chart.repaint();
      return result;
    };
  },
});
