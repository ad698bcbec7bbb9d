// The pages: index (jobs and runs), job (progress, per-domain table, score histograms), run (weights,
// per-domain held-out loss, expert load). Each polls the JSON API with the login cookie.
"use strict";
(() => {
  const root = document.getElementById("app");
  const view = root.dataset.view;
  const args = JSON.parse(root.dataset.args || "{}");
  const POLL_MS = 3000;
  const h = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    for (const k of kids) e.append(k);
    return e;
  };
  const api = async (path) => {
    const r = await fetch(path, {credentials: "same-origin"});
    if (!r.ok) throw new Error(`${path}: ${r.status}`);
    return r.json();
  };
  const section = (title, id) => {
    const s = h("section", {id}, h("h2", {}, title));
    root.append(s);
    return s;
  };
  const box = (parent, cls = "plot") => { const d = h("div", {class: cls}); parent.append(d); return d; };
  const pct = (a, b) => b ? (100 * a / b).toFixed(1) + "%" : "–";
  const enc = (name) => name.split("/").map(encodeURIComponent).join("/");
  const loop = (fn) => { const go = () => fn().catch(e => console.warn(e.message)).finally(() => setTimeout(go, POLL_MS)); go(); };

  function statusCell(s) { return h("span", {class: "status " + s}, s); }

  // ------------------------------------------------------------------ index
  function index() {
    const jobs = section("Jobs", "jobs"), runs = section("Training runs", "runs");
    const jt = box(jobs, "table"), rt = box(runs, "table");
    loop(async () => {
      const j = await api("/api/jobs");
      const t = h("table", {}, h("tr", {}, ...["job", "kind", "status", "shards", "out", "kept"].map(x => h("th", {}, x))));
      for (const job of j.jobs) {
        const p = job.progress;
        t.append(h("tr", {}, h("td", {}, h("a", {href: `/jobs/${job.id}`}, job.id)), h("td", {}, job.kind),
                   h("td", {}, statusCell(job.status)), h("td", {}, `${p.shards_done}/${p.shards_total}`),
                   h("td", {}, job.out), h("td", {}, job.totals && job.totals.kept !== undefined ? `${job.totals.kept}` : "")));
      }
      jt.replaceChildren(j.jobs.length ? t : h("p", {class: "muted"}, "no jobs yet: POST /api/jobs or `curate jobs submit`"));
      const r = await api("/api/runs");
      const rtab = h("table", {}, h("tr", {}, ...["run", "step", "tokens", "loss"].map(x => h("th", {}, x))));
      for (const run of r.runs) {
        rtab.append(h("tr", {}, h("td", {}, h("a", {href: `/runs/${enc(run.name)}`}, run.name)),
                      h("td", {}, `${run.step ?? ""}`), h("td", {}, `${run.tokens ?? ""}`),
                      h("td", {}, run.loss === null || run.loss === undefined ? "" : run.loss.toFixed(4))));
      }
      rt.replaceChildren(r.runs.length ? rtab : h("p", {class: "muted"}, "no training runs under the root"));
    });
  }

  // ------------------------------------------------------------------ job
  function job() {
    const head = section("Progress", "progress");
    const bar = h("div", {class: "bar"}, h("div", {class: "fill"}));
    const line = h("p", {});
    head.append(bar, line);
    const tab = box(section("Kept and removed per domain", "domains"), "table");
    const hist = section("Score histograms", "histograms");
    hist.append(h("p", {class: "muted"}, "documents per score bin, kept (green) and removed (red), per domain"));
    const hbox = box(hist, "hists");
    let finalDrawn = false;
    loop(async () => {
      if (finalDrawn) return;
      const j = await api(`/api/jobs/${args.id}`);
      const p = j.progress;
      bar.firstChild.style.width = (p.shards_total ? 100 * p.shards_done / p.shards_total : 0) + "%";
      line.replaceChildren(statusCell(j.status), ` ${j.kind} → ${j.out}: ${p.shards_done} of ${p.shards_total} shards`,
                           j.error ? h("pre", {class: "error"}, j.error) : "");
      if (j.kind !== "filter") { tab.replaceChildren(h("p", {class: "muted"}, "a tokenize job: see its manifest")); return; }
      const rep = await api(`/api/jobs/${args.id}/report`);
      const cols = ["domain", "docs in", "kept", "kept %", ...rep.reasons.map(r => `removed: ${r}`), "malformed"];
      const t = h("table", {}, h("tr", {}, ...cols.map(c => h("th", {}, c))));
      const sum = {docs_in: 0, kept: 0, malformed: 0, removed: {}};
      for (const [dom, d] of Object.entries(rep.by_domain).sort()) {
        sum.docs_in += d.docs_in; sum.kept += d.kept; sum.malformed += d.malformed;
        for (const r of rep.reasons) sum.removed[r] = (sum.removed[r] || 0) + (d.removed[r] || 0);
        t.append(h("tr", {}, h("td", {}, dom), h("td", {}, `${d.docs_in}`), h("td", {}, `${d.kept}`),
                   h("td", {}, pct(d.kept, d.docs_in)), ...rep.reasons.map(r => h("td", {}, `${d.removed[r] || 0}`)),
                   h("td", {}, `${d.malformed}`)));
      }
      t.append(h("tr", {class: "total"}, h("td", {}, "total"), h("td", {}, `${sum.docs_in}`), h("td", {}, `${sum.kept}`),
                 h("td", {}, pct(sum.kept, sum.docs_in)), ...rep.reasons.map(r => h("td", {}, `${sum.removed[r]}`)),
                 h("td", {}, `${sum.malformed}`)));
      tab.replaceChildren(Object.keys(rep.by_domain).length ? t : h("p", {class: "muted"}, "no shard finished yet"));
      hbox.replaceChildren();
      for (const [col, hd] of Object.entries(rep.histograms)) {
        const g = h("div", {class: "hgroup"}, h("h3", {}, hd.log10 ? `${col} (log10)` : col));
        hbox.append(g);
        for (const [dom, sides] of Object.entries(hd.domains)) {
          const cell = h("div", {class: "hcell"}, h("div", {class: "hname"}, dom));
          g.append(cell);
          const zero = hd.edges.slice(1).map(() => 0);
          Charts.bars(box(cell), hd.edges, [{name: "kept", counts: sides.kept || zero, color: "#59a14f"},
                                             {name: "removed", counts: sides.removed || zero, color: "#e15759"}],
                      {xLabel: hd.log10 ? `log10 ${col}` : col});
        }
      }
      if (!Object.keys(rep.histograms).length) hbox.append(h("p", {class: "muted"}, "no scores yet"));
      finalDrawn = ["done", "failed", "cancelled"].includes(j.status);
    });
  }

  // ------------------------------------------------------------------ run
  // routing records: {step, tokens, <layers>: [[fraction per expert], ...] or {layer: [...]}}
  function routingLayers(rec) {
    for (const [k, v] of Object.entries(rec)) {
      if (k === "step" || k === "tokens") continue;
      if (Array.isArray(v) && v.length && Array.isArray(v[0])) return v.map((x, i) => [`layer ${i}`, x]);
      if (v && typeof v === "object" && !Array.isArray(v)) {
        const ent = Object.entries(v).filter(([, x]) => Array.isArray(x));
        if (ent.length) return ent.map(([n, x]) => [/^\d+$/.test(n) ? `layer ${n}` : n, x]);
      }
    }
    return [];
  }

  function run() {
    const name = enc(args.name);
    const wsec = section("Domain weights", "weights"), lsec = section("Per-domain held-out loss", "eval-loss");
    const tsec = section("Training loss", "train-loss"), rsec = section("Expert load", "expert-load");
    const wbox = box(wsec), lbox = box(lsec), tbox = box(tsec), rbox = box(rsec, "layers");
    const wleg = box(wsec, "legendbox"), lleg = box(lsec, "legendbox");
    loop(async () => {
      const [w, m, r] = await Promise.all([api(`/api/runs/${name}/weights`), api(`/api/runs/${name}/metrics`),
                                          api(`/api/runs/${name}/routing`)]);
      const domains = [...new Set(w.records.flatMap(x => Object.keys(x.weights || {})))];
      Charts.line(wbox, domains.map(d => ({name: d, points: w.records.filter(x => x.weights && d in x.weights)
                                            .map(x => [x.tokens, x.weights[d]])})), {xLabel: "tokens", yMin: 0});
      Charts.line(lbox, domains.map(d => ({name: d, points: w.records.filter(x => x.eval_loss && x.eval_loss[d] != null)
                                            .map(x => [x.tokens, x.eval_loss[d]])})), {xLabel: "tokens"});
      wleg.replaceChildren(); Charts.legend(wleg, domains);
      lleg.replaceChildren(); Charts.legend(lleg, domains);
      Charts.line(tbox, [{name: "loss", points: m.records.filter(x => x.loss != null).map(x => [x.tokens, x.loss])}],
                  {xLabel: "tokens"});
      rbox.replaceChildren();
      if (!r.records.length) { rbox.append(h("p", {class: "muted"}, "no routing.jsonl in this run yet")); return; }
      const layers = routingLayers(r.records[r.records.length - 1]).map(([n]) => n);
      layers.forEach((ln, li) => {
        const cell = h("div", {class: "layer"}, h("h3", {}, ln));
        rbox.append(cell);
        const nexp = routingLayers(r.records[r.records.length - 1])[li][1].length;
        const series = [...Array(nexp).keys()].map(e => ({name: `expert ${e}`, points: r.records.map(rec => {
          const L = routingLayers(rec)[li];
          return L ? [rec.tokens, L[1][e]] : null;
        }).filter(Boolean)}));
        Charts.line(box(cell), series, {xLabel: "tokens", yMin: 0});
      });
    });
  }

  function missing() { root.append(h("p", {class: "muted"}, `${args.what} is not here.`), h("a", {href: "/"}, "back")); }

  ({index, job, run, missing})[view]();
})();
