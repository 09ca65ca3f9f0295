// The Magnitude page's sparsity slider (Streamlit components v2; loaded by ui/sparsity_slider.py).
// The server sends, once per model and threshold, the exact test accuracy and non-zero count at
// every sparsity of its grid; while the thumb moves the metrics are redrawn here, and the server
// hears the chosen grid step on release (an "index" trigger), or 0.35 s after the last key press.

const KEY_COMMIT_MS = 350;

function percent(x, digits) { return (100 * x).toFixed(digits) + "%"; }

class SparsitySlider {
  constructor(root) {
    this.q = (sel) => root.querySelector(sel);
    this.range = this.q(".ps-range");
    this.index = 0;
    this.sent = new Set();  // steps sent to the server whose echo has not come back yet
    this.keyTimer = null;
    this.range.addEventListener("input", () => this.show(Number(this.range.value)));
    this.range.addEventListener("change", () => this.commit());
    this.range.addEventListener("keydown", () => {  // arrows move the native range; commit once they stop
      clearTimeout(this.keyTimer);
      this.keyTimer = setTimeout(() => this.commit(), KEY_COMMIT_MS);
    });
  }

  update(data, setTriggerValue) {
    this.setTriggerValue = setTriggerValue;
    const fresh = !this.data || this.data.signature !== data.signature;
    this.data = data;
    this.range.max = String(data.grid.length - 1);
    // Adopt the server's step when the server changed it (a new model, a link), not when it echoes a
    // step this slider sent: each arrow press commits one, and their answers arrive after newer presses.
    if (fresh) this.sent.clear();
    if (fresh || (data.index !== this.serverIndex && !this.sent.delete(data.index))) {
      this.index = this.committed = data.index;
    }
    this.serverIndex = data.index;
    this.range.value = String(this.index);
    this.show(this.index);
  }

  show(i) {
    const d = this.data;
    this.index = i;
    const s = d.grid[i], acc = d.accuracy[i], nonzero = d.nonzero[i];
    this.q(".ps-value").textContent = percent(s, s >= 0.99 ? 1 : 0);
    this.range.setAttribute("aria-valuetext", `${percent(s, 1)} of the weights pruned`);
    this.q("[data-testid='ps-accuracy']").textContent = percent(acc, 2);
    const delta = (acc - d.baseline) * 100;
    const el = this.q(".ps-metric-delta");
    el.textContent = `${delta >= 0 ? "+" : ""}${delta.toFixed(2)} pts`;
    el.className = "ps-metric-delta " + (delta < -0.005 ? "down" : delta > 0.005 ? "up" : "");
    this.q("[data-testid='ps-nonzero']").textContent =
      `${nonzero.toLocaleString("en-US")} of ${d.total.toLocaleString("en-US")}`;
    this.q("[data-testid='ps-compression']").textContent = `${(d.total / Math.max(1, nonzero)).toFixed(1)}x`;
  }

  commit() {
    clearTimeout(this.keyTimer);
    if (this.index === this.committed) return;
    this.committed = this.index;
    this.sent.add(this.index);
    this.setTriggerValue("index", this.index);
  }
}

export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  const root = parentElement.querySelector(".ps-live");
  if (!root || !data) return;
  if (!root.__live) root.__live = new SparsitySlider(root);
  root.__live.update(data, setTriggerValue);
}
