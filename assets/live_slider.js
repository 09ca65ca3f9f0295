// The Prune page's live slider (Streamlit components v2; loaded by ui/live_slider.py, no build step).
// While the thumb moves, everything is redrawn here in the browser from the data the server sent
// once: the grid's pruned overlay, the accuracy metric and the curve's marker. The server hears
// the new K only on release (a "k" trigger), or 0.35 s after the last key press.

const RED = "rgba(220, 38, 38, 0.78)";
const LINE = "#2563eb";
const FONT_PX = 14;            // chart text never smaller than this
const PLAY_SECONDS = 6;        // a sweep from 0 to P
const KEY_COMMIT_MS = 350;

function decodeTiles(b64) {
  const raw = atob(b64);
  const out = new Uint8ClampedArray(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function percent(x, digits = 2) { return (100 * x).toFixed(digits) + "%"; }

function scrollOffset(el) {
  // Distance from the top of the page's scrolling area, whether or not the page is scrolled.
  const main = el.ownerDocument.querySelector("[data-testid='stMain']");
  return el.getBoundingClientRect().top + (main ? main.scrollTop : 0) + window.scrollY;
}

class LiveSlider {
  constructor(root) {
    this.root = root;
    this.q = (sel) => root.querySelector(sel);
    this.range = this.q(".pe-range");
    this.kOut = this.q(".pe-k");
    this.play = this.q(".pe-play");
    this.grid = this.q(".pe-grid");
    this.curve = this.q(".pe-curve");
    this.tip = this.q(".pe-tip");
    this.k = 0;
    this.serverK = null;
    this.committed = null;
    this.dragging = false;
    this.playing = null;
    this.keyTimer = null;
    this.bind();
    this.resizeObserver = new ResizeObserver(() => this.layout());
    this.resizeObserver.observe(root);
    window.addEventListener("resize", this.onWindowResize = () => this.layout());
  }

  update(data, setTriggerValue) {
    this.setTriggerValue = setTriggerValue;
    const fresh = !this.data || this.data.signature !== data.signature;
    this.data = data;
    if (fresh) {
      this.tiles = decodeTiles(data.tiles);
      this.base = null;
      this.committed = data.k;
    }
    this.range.max = String(data.channels);
    this.root.classList.toggle("present", !!data.present);
    // Adopt the server's K when the server changed it (a new model, a link); keep the local K
    // when the server is only echoing what this slider sent.
    if (fresh || (data.k !== this.serverK && !this.dragging && !this.playing)) this.k = data.k;
    this.serverK = data.k;
    this.q(".pe-grid-caption").textContent = data.grid_caption;
    this.grid.setAttribute("aria-label", data.grid_caption);
    this.curve.setAttribute("aria-label", data.curve_title);
    this.layout();
  }

  bind() {
    const r = this.range;
    r.addEventListener("pointerdown", () => { this.dragging = true; this.stop(false); });
    r.addEventListener("input", () => this.show(Number(r.value)));
    r.addEventListener("change", () => { this.dragging = false; this.commit(); });
    r.addEventListener("pointerup", () => { this.dragging = false; });
    r.addEventListener("keydown", (e) => {
      const P = this.data.channels;
      const step = { ArrowLeft: -1, ArrowDown: -1, ArrowRight: 1, ArrowUp: 1, PageDown: -32, PageUp: 32 }[e.key];
      let k = null;
      if (step !== undefined) k = this.k + step;
      else if (e.key === "Home") k = 0;
      else if (e.key === "End") k = P;
      if (k === null) return;
      e.preventDefault();
      this.stop(false);
      this.show(Math.max(0, Math.min(P, k)));
      clearTimeout(this.keyTimer);
      this.keyTimer = setTimeout(() => this.commit(), KEY_COMMIT_MS);
    });
    this.play.addEventListener("click", () => (this.playing ? this.stop(true) : this.start()));
    this.grid.addEventListener("mousemove", (e) => this.hover(e));
    this.grid.addEventListener("mouseleave", () => { this.tip.hidden = true; });
  }

  start() {
    const P = this.data.channels;
    const from = this.k >= P ? 0 : this.k;
    const t0 = performance.now();
    this.play.setAttribute("aria-pressed", "true");
    this.play.innerHTML = "&#10074;&#10074;";
    const frame = (now) => {
      const k = Math.min(P, from + Math.floor((now - t0) / 1000 * P / PLAY_SECONDS));
      this.show(k);
      if (k >= P) { this.stop(true); return; }
      this.playing = requestAnimationFrame(frame);
    };
    this.playing = requestAnimationFrame(frame);
  }

  stop(commit) {
    if (!this.playing) return;
    cancelAnimationFrame(this.playing);
    this.playing = null;
    this.play.setAttribute("aria-pressed", "false");
    this.play.innerHTML = "&#9654;";
    if (commit) this.commit();
  }

  commit() {
    clearTimeout(this.keyTimer);
    if (this.k !== this.committed && this.setTriggerValue) {
      this.committed = this.k;
      this.setTriggerValue("k", this.k);
    }
  }

  accuracyAt(k) {
    const d = this.data;
    if (d.accuracy) return { acc: d.accuracy[k], exact: true };
    return { acc: d.known_accuracy, exact: k === d.k };  // a middle layer: the last value the server sent
  }

  // --- drawing ---------------------------------------------------------------------------
  show(k) {
    this.k = k;
    const d = this.data, P = d.channels;
    this.range.value = String(k);
    const { acc, exact } = this.accuracyAt(k);
    const kText = d.axis === "%" ? `${percent(k / P, 1)} pruned (K = ${k} of ${P})` : `K = ${k} of ${P} (${percent(k / P, 0)})`;
    this.kOut.textContent = kText;
    this.range.setAttribute("aria-valuetext", `${k} of ${P} channels pruned, test accuracy ${percent(acc)}`);
    this.q("[data-testid='pe-accuracy']").textContent = percent(acc);
    const delta = (acc - d.baseline) * 100;
    const deltaEl = this.q(".pe-metric-delta");
    deltaEl.textContent = `${delta >= 0 ? "+" : ""}${delta.toFixed(2)} pts vs K = 0`;
    deltaEl.className = "pe-metric-delta " + (delta < -0.005 ? "down" : delta > 0.005 ? "up" : "");
    this.q("[data-testid='pe-channels']").textContent = `${P - k} of ${P}`;
    this.q("[data-testid='pe-parameters']").textContent = (d.total_params - k * d.per_filter).toLocaleString("en-US");
    this.q(".pe-note").textContent = exact ? d.note : `${d.note} Accuracy shown: the last known value (K = ${d.k}); ` +
      "release the slider to compute this K.";
    this.drawGrid();
    this.drawCurve();
  }

  layout() {
    if (!this.data) return;
    const d = this.data;
    const width = this.root.clientWidth;
    if (!width) return;
    const top = scrollOffset(this.q(".pe-figures"));
    const caption = d.present ? 0 : 30;  // presentation mode hides the caption (live_slider.css)
    const avail = Math.max(180, window.innerHeight - top - caption - 24);
    const gw0 = d.cols * (d.w + 1) - 1, gh0 = d.rows * (d.h + 1) - 1;
    const aspect = gw0 / gh0;
    // The grid gets what the curve can spare (the curve keeps at least 380 px or 38% of the width).
    let gh = Math.min(avail, Math.max(width * 0.62, width - 380) / aspect);
    let gw = gh * aspect;
    this.size(this.grid, Math.floor(gw), Math.floor(gh));
    this.q(".pe-grid-box").style.width = Math.floor(gw) + "px";
    const cw = Math.max(260, width - gw - 24);
    this.size(this.curve, Math.floor(cw), Math.floor(Math.max(220, Math.min(avail + caption, Math.max(gh, 0.6 * cw)))));
    this.show(this.k);
  }

  size(canvas, w, h) {
    const ratio = window.devicePixelRatio || 1;
    canvas.style.width = w + "px";
    canvas.style.height = h + "px";
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    canvas.dataset.ratio = ratio;
  }

  baseImage() {
    if (this.base) return this.base;
    const d = this.data;
    const gw0 = d.cols * (d.w + 1) - 1, gh0 = d.rows * (d.h + 1) - 1;
    const off = document.createElement("canvas");
    off.width = gw0; off.height = gh0;
    const ctx = off.getContext("2d");
    const img = ctx.createImageData(gw0, gh0);
    img.data.fill(255);
    const n = d.h * d.w;
    for (let i = 0; i < d.channels; i++) {
      const r = Math.floor(i / d.cols), c = i % d.cols;
      for (let y = 0; y < d.h; y++) for (let x = 0; x < d.w; x++) {
        const v = this.tiles[i * n + y * d.w + x];
        const p = ((r * (d.h + 1) + y) * gw0 + c * (d.w + 1) + x) * 4;
        img.data[p] = img.data[p + 1] = img.data[p + 2] = v;
      }
    }
    ctx.putImageData(img, 0, 0);
    return (this.base = off);
  }

  drawGrid() {
    const d = this.data, cv = this.grid, ctx = cv.getContext("2d");
    const sx = cv.width / (d.cols * (d.w + 1) - 1), sy = cv.height / (d.rows * (d.h + 1) - 1);
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, cv.width, cv.height);
    ctx.drawImage(this.baseImage(), 0, 0, cv.width, cv.height);
    ctx.fillStyle = RED;
    for (let i = 0; i < this.k; i++) {  // tiles are in pruning order: the first K are the pruned ones
      const r = Math.floor(i / d.cols), c = i % d.cols;
      ctx.fillRect(c * (d.w + 1) * sx, r * (d.h + 1) * sy, d.w * sx, d.h * sy);
    }
  }

  hover(e) {
    const d = this.data, rect = this.grid.getBoundingClientRect();
    const c = Math.floor((e.clientX - rect.left) / rect.width * (d.cols * (d.w + 1) - 1) / (d.w + 1));
    const r = Math.floor((e.clientY - rect.top) / rect.height * (d.rows * (d.h + 1) - 1) / (d.h + 1));
    const i = r * d.cols + c;
    if (c < 0 || c >= d.cols || r < 0 || i >= d.channels) { this.tip.hidden = true; return; }
    this.tip.hidden = false;
    this.tip.textContent = `channel ${d.channel_of[i]} · score ${Number(d.scores[i]).toPrecision(4)} · rank ${i}` +
      (i < this.k ? " · pruned" : "");
    this.tip.style.left = (e.clientX - rect.left + 12) + "px";
    this.tip.style.top = (e.clientY - rect.top + 12) + "px";
  }

  drawCurve() {
    const d = this.data, cv = this.curve, ctx = cv.getContext("2d");
    const ratio = Number(cv.dataset.ratio || 1);
    const W = cv.width / ratio, H = cv.height / ratio;
    const big = d.present ? 18 : FONT_PX + 1;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const text = getComputedStyle(this.root).color || "#31333f";
    ctx.font = `${big}px sans-serif`;
    const clipped = [];  // any text drawn past the canvas's edge (a browser test reads data-clipped)
    const put = (s, x, y) => {
      const w = ctx.measureText(s).width;
      const left = ctx.textAlign === "center" ? x - w / 2 : ctx.textAlign === "right" ? x - w : x;
      if (left < -0.5 || left + w > W + 0.5) clipped.push(s);
      ctx.fillText(s, x, y);
    };
    // The title on as many lines as the width needs (split at its " · "), never past the edge.
    const title = [];
    for (const part of d.curve_title.split(" · ")) {
      const last = title.length ? title[title.length - 1] + " · " + part : null;
      if (last !== null && ctx.measureText(last).width <= W) title[title.length - 1] = last;
      else title.push(part);
    }
    const lastTick = d.axis === "%" ? "100%" : String(d.channels);
    const m = { l: 3.6 * big, r: Math.max(14, ctx.measureText(lastTick).width / 2 + 4), t: (title.length + 1) * big,
                b: 2.9 * big };
    const P = d.channels, pw = W - m.l - m.r, ph = H - m.t - m.b;
    const X = (k) => m.l + (k / P) * pw, Y = (a) => m.t + (1 - a / 1.02) * ph;
    ctx.fillStyle = text;
    ctx.textBaseline = "alphabetic"; ctx.textAlign = "left";
    title.forEach((line, i) => put(line, 0, (i + 1) * big + 2));
    // axes and grid lines
    ctx.strokeStyle = "rgba(128,128,128,0.35)"; ctx.lineWidth = 1;
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (let a = 0; a <= 1.0001; a += 0.2) {
      ctx.beginPath(); ctx.moveTo(m.l, Y(a)); ctx.lineTo(m.l + pw, Y(a)); ctx.stroke();
      put(Math.round(a * 100) + "%", m.l - 6, Y(a));
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    const ticks = d.axis === "%" ? [0, 0.25, 0.5, 0.75, 1].map((f) => f * P) : d.k_ticks;
    for (const k of ticks) {
      ctx.beginPath(); ctx.moveTo(X(k), m.t); ctx.lineTo(X(k), m.t + ph); ctx.stroke();
      put(d.axis === "%" ? Math.round(100 * k / P) + "%" : String(Math.round(k)), X(k), m.t + ph + 5);
    }
    put(d.axis === "%" ? "% of channels pruned" : "channels pruned (K)", m.l + pw / 2, m.t + ph + big + 10);
    // chance level (its label drawn after the curve, on a white halo, so a curve near chance never hides it)
    const chance = d.chance !== null && d.chance !== undefined;
    if (chance) {
      ctx.save(); ctx.setLineDash([5, 5]); ctx.strokeStyle = "grey";
      ctx.beginPath(); ctx.moveTo(m.l, Y(d.chance)); ctx.lineTo(m.l + pw, Y(d.chance)); ctx.stroke();
      ctx.restore();
    }
    // the curve, or the points known so far
    ctx.strokeStyle = LINE; ctx.lineWidth = 2.5;
    if (d.accuracy) {
      ctx.beginPath();
      d.accuracy.forEach((a, k) => (k ? ctx.lineTo(X(k), Y(a)) : ctx.moveTo(X(k), Y(a))));
      ctx.stroke();
    } else {  // the exact points known so far (sorted by K), joined by a thin line
      ctx.save(); ctx.lineWidth = 1.2; ctx.globalAlpha = 0.6; ctx.beginPath();
      d.known.forEach(([k, a], i) => (i ? ctx.lineTo(X(k), Y(a)) : ctx.moveTo(X(k), Y(a))));
      ctx.stroke(); ctx.restore();
      ctx.fillStyle = LINE;
      for (const [k, a] of d.known) { ctx.beginPath(); ctx.arc(X(k), Y(a), 4, 0, 2 * Math.PI); ctx.fill(); }
    }
    if (chance) {
      ctx.save(); ctx.textAlign = "left"; ctx.textBaseline = "bottom";  // left: where the curve is still high
      ctx.lineWidth = 4; ctx.strokeStyle = "white"; ctx.lineJoin = "round";
      ctx.strokeText("chance", m.l + 6, Y(d.chance) - 3);
      ctx.fillStyle = "grey"; put("chance", m.l + 6, Y(d.chance) - 3);
      ctx.restore();
    }
    cv.dataset.clipped = clipped.join(" | ");
    // the current K
    const { acc } = this.accuracyAt(this.k);
    const mk = d.accuracy ? this.k : d.k;
    ctx.save(); ctx.setLineDash([3, 4]); ctx.strokeStyle = "rgba(220,38,38,0.7)"; ctx.lineWidth = 1.5;
    ctx.beginPath(); ctx.moveTo(X(this.k), m.t); ctx.lineTo(X(this.k), m.t + ph); ctx.stroke(); ctx.restore();
    ctx.beginPath(); ctx.arc(X(mk), Y(acc), 8, 0, 2 * Math.PI);
    ctx.fillStyle = "#dc2626"; ctx.fill(); ctx.lineWidth = 2.5; ctx.strokeStyle = "white"; ctx.stroke();
    this.curve.dataset.markerX = String(Math.round(X(mk)));
    this.curve.dataset.markerY = String(Math.round(Y(acc)));
  }

  destroy() {
    this.stop(false);
    clearTimeout(this.keyTimer);
    this.resizeObserver.disconnect();
    window.removeEventListener("resize", this.onWindowResize);
  }
}

export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  const root = parentElement.querySelector(".pe-live");
  if (!root || !data) return;
  if (!root.__live) root.__live = new LiveSlider(root);
  root.__live.update(data, setTriggerValue);
  return () => {
    // Streamlit calls this when the component leaves the page; a new mount builds a new one.
    if (!root.isConnected) { root.__live.destroy(); root.__live = null; }
  };
}
