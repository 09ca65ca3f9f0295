// Every piece of text the page shows that does not fit its box, in words (tests/test_browser.py).
// HTML text: an element with its own text whose box, or one of its next four ancestors with an
// overflow other than visible, is wider than it can show (Streamlit cuts such text with "..." or
// hides it). Plotly's text: outside its chart's svg. The live slider's canvas: what it drew past
// its edge (assets/live_slider.js writes data-clipped). Code blocks and tables scroll by design.
() => {
  const out = [];
  const seen = new Set();
  const visible = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  for (const el of document.querySelectorAll("[data-testid=stApp] *")) {
    if (el.closest("pre, code, [data-testid=stCode], .js-plotly-plot, [data-testid=stDataFrame], [data-testid=stTable]")) continue;
    const text = [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join("").trim();
    if (!text || !visible(el) || el.clientWidth <= 1) continue;  // a visually hidden skip link is not shown text
    let a = el;
    for (let i = 0; i < 4 && a && a !== document.body; i++, a = a.parentElement) {
      const s = getComputedStyle(a);
      if (s.overflowX !== "visible" && a.scrollWidth > a.clientWidth + 1) {
        const key = text.slice(0, 60);
        if (!seen.has(key)) { seen.add(key); out.push(`text "${key}" clipped by <${a.tagName.toLowerCase()} ${a.getAttribute("data-testid") || a.className || ""}> (${a.scrollWidth} > ${a.clientWidth})`); }
        break;
      }
    }
  }
  for (const svg of document.querySelectorAll(".js-plotly-plot svg.main-svg")) {
    const r = svg.getBoundingClientRect();
    if (!r.width) continue;
    for (const t of svg.querySelectorAll("text")) {
      const b = t.getBoundingClientRect();
      if (!b.width || !t.textContent.trim()) continue;
      if (b.left < r.left - 1 || b.right > r.right + 1 || b.top < r.top - 1 || b.bottom > r.bottom + 1)
        out.push(`plot text "${t.textContent.slice(0, 60)}" outside its chart`);
    }
  }
  for (const cv of document.querySelectorAll("canvas[data-clipped]"))  // text the live slider drew past its edge
    if (cv.dataset.clipped) out.push(`canvas text "${cv.dataset.clipped}" past the edge`);
  return out;
}
