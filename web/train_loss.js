// Train LoRA: a live loss curve inside the node, fed by the server's "musubi.train.progress"
// events ({node, step, loss, lrs}, one per optimizer step). Without events (API runs) the widget
// only says it is waiting; the node's PNG plot covers that case.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "MusubiTrainLoRA";
const EVENT = "musubi.train.progress";
const LOSS_COLOR = "#7f9fcc";
const AVERAGE_COLOR = "#f0c04a";

const runs = new Map(); // node id → { steps, losses, sums, lrs }
const charts = new Set(); // { node, repaint } of every Train LoRA node on the canvas

function recordStep({ node, step, loss, lrs }) {
  const id = String(node);
  let run = runs.get(id);
  const last = run?.steps[run.steps.length - 1];
  if (!run || step <= last) {
    // a new run: step 1 again, or steps going back (a resume from an earlier checkpoint)
    run = { steps: [], losses: [], sums: [0], lrs: {} };
    runs.set(id, run);
  }
  const value = Number.isFinite(loss) ? loss : NaN;
  run.steps.push(step);
  run.losses.push(value);
  run.sums.push(run.sums[run.sums.length - 1] + (Number.isFinite(value) ? value : 0));
  run.lrs = lrs ?? {};
  for (const chart of charts) if (String(chart.node.id) === id) chart.repaint();
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
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#aaa";
  if (!run || run.steps.length === 0) {
    ctx.fillText("loss curve: waiting for training steps…", 8, 18);
    return;
  }

  const count = run.steps.length;
  const smoothing = averageWindow(count);
  let low = Infinity, high = -Infinity;
  for (const value of run.losses) {
    if (value < low) low = value;
    if (value > high) high = value;
  }
  if (low > high) [low, high] = [0, 1]; // no finite loss yet
  const span = high - low || Math.abs(high) || 1;
  const top = 20, bottom = height - 6, left = 6, right = width - 6;
  const firstStep = run.steps[0], lastStep = run.steps[count - 1];
  const x = (step) => left + ((step - firstStep) / Math.max(1, lastStep - firstStep)) * (right - left);
  const y = (loss) => bottom - ((loss - low) / span) * (bottom - top);
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
    ctx.fillRect(x(firstStep) - 2, y(run.losses[0]) - 2, 4, 4);
  }

  const lastAverage = average(run, count - 1, smoothing);
  ctx.fillStyle = "#ddd";
  ctx.fillText(
    `step ${lastStep}  loss ${formatNumber(run.losses[count - 1])}` +
      (smoothing > 1 ? `  avg${smoothing} ${formatNumber(lastAverage)}` : "") +
      `  ${formatRates(run.lrs)}`,
    8, 14);
  ctx.fillStyle = "#888";
  ctx.textAlign = "right";
  ctx.fillText(`${formatNumber(high)} … ${formatNumber(low)}`, right, 14);
  ctx.textAlign = "left";
}

app.registerExtension({
  name: "musubi.TrainLossCurve",
  setup() {
    api.addEventListener(EVENT, (event) => {
      if (event?.detail && event.detail.node != null) recordStep(event.detail);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const canvas = document.createElement("canvas");
      canvas.style.cssText = "width:100%;height:100%;display:block;border-radius:4px";
      const widget = this.addDOMWidget("loss_curve", "musubi_loss_curve", canvas, {
        serialize: false,
        getMinHeight: () => 120,
      });
      widget.serialize = false; // a picture, not a value: keep widgets_values unchanged
      let pending = false;
      const chart = {
        node: this,
        repaint: () => {
          if (pending) return;
          pending = true;
          requestAnimationFrame(() => {
            pending = false;
            draw(canvas, runs.get(String(this.id)));
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
      return result;
    };
  },
});
