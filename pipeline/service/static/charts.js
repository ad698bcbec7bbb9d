// Small SVG charts drawn in the browser (no library, no network): line charts with a hover readout
// and stacked bar histograms. Used by app.js.
"use strict";
const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
                   "#ff9da7", "#9c755f", "#bab0ac"];
  const el = (name, attrs = {}, parent = null) => {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  };
  const fmt = (v) => {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(2) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(2) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 1) return v.toFixed(3);
    if (a < 1e-3) return v === 0 ? "0" : v.toExponential(1);
    return v.toPrecision(3);
  };
  const ticks = (lo, hi, n) => {
    const out = [];
    for (let i = 0; i <= n; i++) out.push(lo + (hi - lo) * i / n);
    return out;
  };
  const tip = () => document.getElementById("tip");
  // colours are set through the CSSOM: the pages' CSP refuses inline style attributes
  const swatch = (color) => {
    const i = document.createElement("i");
    i.className = "sw"; i.style.background = color;
    return i;
  };

  // series: [{name, points: [[x, y], ...]}]; opts: {xLabel, yLabel, yMin, yMax}
  function line(container, series, opts = {}) {
    container.textContent = "";
    const W = 560, H = 260, m = {l: 56, r: 24, t: 12, b: 36};
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img"}, container);
    const pts = series.flatMap(s => s.points);
    if (!pts.length) {
      el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"}, svg).textContent = "no data yet";
      return svg;
    }
    let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
    let y0 = opts.yMin ?? Math.min(...pts.map(p => p[1]));
    let y1 = opts.yMax ?? Math.max(...pts.map(p => p[1]));
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 += 0.5; y0 -= 0.5; }
    const X = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
    const Y = y => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
    const axes = el("g", {class: "axes"}, svg);
    for (const t of ticks(y0, y1, 4)) {
      el("line", {x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), class: "grid"}, axes);
      el("text", {x: m.l - 6, y: Y(t) + 4, "text-anchor": "end"}, axes).textContent = fmt(t);
    }
    for (const t of ticks(x0, x1, 4)) {
      el("text", {x: X(t), y: H - m.b + 16, "text-anchor": "middle"}, axes).textContent = fmt(t);
    }
    if (opts.xLabel) el("text", {x: (W + m.l) / 2, y: H - 4, "text-anchor": "middle", class: "label"}, axes).textContent = opts.xLabel;
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
      el("path", {d, class: "series", stroke: color, "data-series": s.name}, svg);
      if (s.points.length === 1) el("circle", {cx: X(s.points[0][0]), cy: Y(s.points[0][1]), r: 3, fill: color}, svg);
    });
    // hover: a vertical rule at the nearest x and every series' value there
    const xs = [...new Set(pts.map(p => p[0]))].sort((a, b) => a - b);
    const rule = el("line", {y1: m.t, y2: H - m.b, class: "rule", visibility: "hidden"}, svg);
    const overlay = el("rect", {x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, class: "overlay"}, svg);
    overlay.addEventListener("mousemove", (ev) => {
      const box = svg.getBoundingClientRect();
      const sx = (ev.clientX - box.left) / box.width * W;
      const xv = x0 + (sx - m.l) / (W - m.l - m.r) * (x1 - x0);
      let best = xs[0];
      for (const x of xs) if (Math.abs(x - xv) < Math.abs(best - xv)) best = x;
      rule.setAttribute("x1", X(best)); rule.setAttribute("x2", X(best)); rule.setAttribute("visibility", "visible");
      const t = tip();
      t.replaceChildren();
      const head = document.createElement("div");
      head.className = "tx"; head.textContent = `${opts.xLabel || "x"} ${fmt(best)}`;
      t.appendChild(head);
      series.forEach((s, i) => {
        const p = s.points.find(q => q[0] === best);
        if (!p) return;
        const row = document.createElement("div");
        row.appendChild(swatch(s.color || PALETTE[i % PALETTE.length]));
        row.appendChild(document.createTextNode(`${s.name}: ${fmt(p[1])}`));
        t.appendChild(row);
      });
      t.hidden = false;
      t.style.left = (ev.pageX + 14) + "px"; t.style.top = (ev.pageY + 10) + "px";
    });
    overlay.addEventListener("mouseleave", () => { tip().hidden = true; rule.setAttribute("visibility", "hidden"); });
    return svg;
  }

  // A legend of coloured swatches, one per series name.
  function legend(container, names) {
    const div = document.createElement("div");
    div.className = "legend";
    names.forEach((n, i) => {
      const s = document.createElement("span");
      s.appendChild(swatch(PALETTE[i % PALETTE.length]));
      s.appendChild(document.createTextNode(n));
      div.appendChild(s);
    });
    container.appendChild(div);
  }

  // Histogram: edges (n+1), stacks: [{name, counts (n), color}]
  function bars(container, edges, stacks, opts = {}) {
    container.textContent = "";
    const W = 360, H = 180, m = {l: 40, r: 18, t: 8, b: 30};
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart hist", role: "img"}, container);
    const n = edges.length - 1;
    const tot = [...Array(n).keys()].map(i => stacks.reduce((a, s) => a + s.counts[i], 0));
    const top = Math.max(1, ...tot);
    const bw = (W - m.l - m.r) / n;
    const Y = v => H - m.b - v / top * (H - m.t - m.b);
    for (const t of ticks(0, top, 2)) {
      el("text", {x: m.l - 4, y: Y(t) + 4, "text-anchor": "end", class: "axes"}, svg).textContent = String(Math.round(t));
    }
    for (let i = 0; i < n; i++) {
      let base = 0;
      for (const s of stacks) {
        const c = s.counts[i];
        if (!c) continue;
        const r = el("rect", {x: m.l + i * bw + 0.5, width: Math.max(bw - 1, 1), y: Y(base + c),
                              height: Y(base) - Y(base + c), fill: s.color, class: "hbar"}, svg);
        el("title", {}, r).textContent = `${s.name} ${c} in [${fmt(edges[i])}, ${fmt(edges[i + 1])})`;
        base += c;
      }
    }
    for (const i of [0, Math.floor(n / 2), n]) {
      el("text", {x: m.l + i * bw, y: H - m.b + 14, "text-anchor": "middle", class: "axes"}, svg).textContent =
        edges[edges.length - 1] - edges[0] >= 0.1 ? edges[i].toFixed(2) : fmt(edges[i]);
    }
    if (opts.xLabel) el("text", {x: (W + m.l) / 2, y: H - 2, "text-anchor": "middle", class: "axes label"}, svg).textContent = opts.xLabel;
    return svg;
  }

  return {line, bars, legend, PALETTE};
})();
