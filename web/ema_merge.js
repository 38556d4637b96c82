// Post-Hoc EMA Merge: a "pick checkpoints" button that lists the step checkpoints in the loras
// folders (<name>-stepNNNNNN.safetensors: no final LoRAs, no files of resume states) with
// checkboxes and writes the chosen names into the node's `checkpoints` text, one per line.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// A trainer's step checkpoint, outside any resume state folder ("…-stepNNNNNN-state/").
const STEP_CHECKPOINT = /(^|\/)[^/]+-step\d{6,}\.safetensors$/;
const IN_STATE_FOLDER = /-step\d{6,}-state\//;
function isStepCheckpoint(name) {
  const path = name.replaceAll("\\", "/");
  return STEP_CHECKPOINT.test(path) && !IN_STATE_FOLDER.test(path);
}

function pickerDialog(names, chosen, onDone) {
  const overlay = document.createElement("div");
  overlay.style.cssText =
    "position:fixed;inset:0;background:rgba(0,0,0,.5);z-index:10000;display:flex;align-items:center;justify-content:center";
  const box = document.createElement("div");
  box.style.cssText =
    "background:var(--comfy-menu-bg,#222);color:var(--input-text,#ddd);padding:12px;border-radius:6px;" +
    "max-height:80vh;width:min(640px,90vw);display:flex;flex-direction:column;gap:8px;font:13px sans-serif";
  const filter = document.createElement("input");
  filter.placeholder = "filter, e.g. my_lora/";
  const list = document.createElement("div");
  list.style.cssText = "overflow:auto;flex:1;border:1px solid #555;padding:4px";
  if (!names.length) list.textContent = "No step checkpoints (<name>-stepNNNNNN.safetensors) in the loras folders yet.";
  const boxes = names.map((name) => {
    const label = document.createElement("label");
    label.style.display = "block";
    const check = document.createElement("input");
    check.type = "checkbox";
    check.checked = chosen.has(name);
    label.append(check, " " + name);
    list.append(label);
    return { name, label, check };
  });
  filter.oninput = () => {
    const text = filter.value.toLowerCase();
    for (const { name, label } of boxes) label.style.display = name.toLowerCase().includes(text) ? "block" : "none";
  };
  const buttons = document.createElement("div");
  buttons.style.cssText = "display:flex;gap:8px;justify-content:flex-end";
  const all = Object.assign(document.createElement("button"), { textContent: "select shown" });
  all.onclick = () => boxes.forEach((b) => b.label.style.display !== "none" && (b.check.checked = true));
  const ok = Object.assign(document.createElement("button"), { textContent: "OK" });
  ok.onclick = () => {
    onDone(boxes.filter((b) => b.check.checked).map((b) => b.name));
    overlay.remove();
  };
  const cancel = Object.assign(document.createElement("button"), { textContent: "Cancel" });
  cancel.onclick = () => overlay.remove();
  buttons.append(all, cancel, ok);
  box.append(filter, list, buttons);
  overlay.append(box);
  document.body.append(overlay);
  filter.focus();
}

app.registerExtension({
  name: "musubi.PostHocEMAMerge",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "MusubiPostHocEMAMerge") return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const text = this.widgets?.find((w) => w.name === "checkpoints");
      const button = this.addWidget("button", "pick checkpoints…", null, async () => {
        const response = await api.fetchApi("/models/loras");
        const names = (await response.json()).filter(isStepCheckpoint);
        const chosen = new Set((text?.value ?? "").split("\n").map((s) => s.trim()));
        pickerDialog(names, chosen, (picked) => {
          if (text) text.value = picked.join("\n");
          this.setDirtyCanvas(true, true);
        });
      }, { serialize: false });
      button.serialize = false; // a button holds no value: keep widgets_values unchanged
      return result;
    };
    // The run's report (each checkpoint's weight; with candidates, the validation-loss table) as
    // read-only text on the node, in a fixed-width font so the table's columns line up.
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = executed?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      if (!text) return result;
      let widget = this.widgets?.find((w) => w.name === "candidate_report");
      if (!widget) {
        const area = document.createElement("textarea");
        area.readOnly = true;
        area.className = "musubi-ema-report";
        area.style.cssText = "width:100%;height:100%;resize:none;font:11px/1.35 monospace;white-space:pre;" +
          "background:var(--comfy-input-bg,#222);color:var(--input-text,#ddd);border:none;border-radius:4px;padding:4px";
        widget = this.addDOMWidget("candidate_report", "musubi_ema_report", area, {
          serialize: false, getValue: () => area.value, setValue: () => {}, getMinHeight: () => 150,
        });
        widget.serialize = false; // a report, not a value: keep widgets_values unchanged
      }
      widget.element.value = text;
      const wanted = this.computeSize?.();
      if (wanted && (this.size[1] < wanted[1] || this.size[0] < wanted[0])) this.setSize([Math.max(this.size[0], wanted[0]), Math.max(this.size[1], wanted[1])]);
      this.setDirtyCanvas?.(true, true);
      return result;
    };
  },
});
