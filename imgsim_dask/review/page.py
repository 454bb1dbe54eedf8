"""The review page's HTML, style and script: one static document whose data arrives as JSON.

The script builds every element from that JSON with `textContent` and attributes, never
with HTML strings, so a CSV field is always text. The Content-Security-Policy allows only
this style and this script (by their hashes) and images from `data:` or beside the page:
nothing loads from the network, and nothing injected runs.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header,section{margin:0 auto;max-width:1200px;padding:12px 20px}
header{background:#fff;border-bottom:1px solid #ddd;max-width:none}
h1{font-size:20px;margin:4px 0}h2{font-size:16px;margin:18px 0 8px}
.meta{color:#555}.warn{color:#a40}.note{color:#666;font-size:12px}
.controls{display:flex;gap:16px;align-items:center;flex-wrap:wrap;position:sticky;top:0;
background:#f6f6f4ee;padding:8px 0;z-index:1}
#threshold{width:320px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.pair,.group{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.pair{display:grid;grid-template-columns:1fr auto 1fr;gap:8px;width:560px;align-items:start}
.pair.below{border-color:#d9a;background:#fff8f8}
.side{overflow:hidden}.side .field{font-size:12px;color:#444;word-break:break-all}
.sim{font-weight:600;align-self:center;text-align:center;min-width:56px}
.thumb,.placeholder{width:128px;height:128px;object-fit:contain;background:#eee;
display:block}
.placeholder{display:flex;align-items:center;justify-content:center;color:#999;font-size:11px}
.group{width:100%}.members{display:flex;flex-wrap:wrap;gap:6px}
.member{width:132px;font-size:11px;word-break:break-all}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 6px;
text-align:left;font-size:12px;vertical-align:top}
svg{background:#fff;border:1px solid #ddd}
"""

SCRIPT = """
"use strict";
const data = JSON.parse(document.getElementById("imgsim-data").textContent);
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}
function thumb(image) {
  if (image === null || image === undefined || data.images[image] === null) {
    return el("div", {class: "placeholder"}, "no thumbnail");
  }
  return el("img", {class: "thumb", src: data.images[image], alt: "", loading: "lazy"});
}
function side(row) {
  const box = el("div", {class: "side"}, thumb(row.image));
  for (const [name, value] of row.fields) {
    box.append(el("div", {class: "field"}, name + ": " + value));
  }
  return box;
}
function pairCard(pair) {
  const card = el("div", {class: "pair"}, side(pair.a),
    el("div", {class: "sim"}, pair.s.toFixed(3)), side(pair.b));
  card.dataset.s = pair.s;
  return card;
}
const threshold = document.getElementById("threshold");
const shownLabel = document.getElementById("threshold-value");
const order = document.getElementById("order");
function fillPairs(id, pairs) {
  const box = document.getElementById(id);
  const sorted = [...pairs].sort((x, y) => order.value === "asc" ? x.s - y.s : y.s - x.s);
  box.replaceChildren(...sorted.map(pairCard));
}
function histogram() {
  const svg = document.getElementById("histogram");
  const ns = "http://www.w3.org/2000/svg";
  const width = 600, height = 160, bins = data.histogram.edges.length - 1;
  const lo = data.histogram.edges[0], hi = data.histogram.edges[bins];
  const top = Math.max(1, ...data.histogram.kept, ...data.histogram.sample);
  const x = (v) => 30 + (width - 40) * (v - lo) / (hi - lo);
  svg.replaceChildren();
  for (const [series, color, scale] of [["sample", "#9ab", data.histogram.sampleScale],
                                        ["kept", "#e73", 1]]) {
    data.histogram[series].forEach((count, i) => {
      const h = (height - 30) * Math.sqrt(count * scale / top);
      const r = document.createElementNS(ns, "rect");
      const left = x(data.histogram.edges[i]), right = x(data.histogram.edges[i + 1]);
      r.setAttribute("x", left);
      r.setAttribute("width", Math.max(1, right - left - 1));
      r.setAttribute("y", height - 20 - h);
      r.setAttribute("height", h);
      r.setAttribute("fill", color);
      r.setAttribute("opacity", series === "sample" ? 0.6 : 0.9);
      r.setAttribute("class", "bar " + series);
      svg.append(r);
    });
  }
  for (const v of [lo, (lo + hi) / 2, hi]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x(v) - 10); t.setAttribute("y", height - 5);
    t.setAttribute("font-size", "11"); t.textContent = v.toFixed(2);
    svg.append(t);
  }
  const line = document.createElementNS(ns, "line");
  line.setAttribute("id", "threshold-line");
  line.setAttribute("y1", 0); line.setAttribute("y2", height - 20);
  line.setAttribute("stroke", "#c00"); line.setAttribute("stroke-width", 2);
  svg.append(line);
  svg.dataset.x0 = lo; svg.dataset.x1 = hi;
  return (value) => { line.setAttribute("x1", x(value)); line.setAttribute("x2", x(value)); };
}
const moveLine = histogram();
function applyThreshold() {
  const value = Number(threshold.value);
  shownLabel.textContent = value.toFixed(3);
  moveLine(value);
  let visible = 0;
  for (const card of document.querySelectorAll("#pairs .pair")) {
    const show = Number(card.dataset.s) >= value;
    card.hidden = !show;
    if (show) visible += 1;
  }
  for (const card of document.querySelectorAll("#borderline-pairs .pair")) {
    card.classList.toggle("below", Number(card.dataset.s) < value);
  }
  document.getElementById("visible").textContent = visible;
}
function render() {
  fillPairs("borderline-pairs", data.borderline);
  fillPairs("pairs", data.pairs);
  const groups = document.getElementById("groups");
  for (const group of data.groups) {
    const members = el("div", {class: "members"});
    for (const member of group.members) {
      const card = el("div", {class: "member"}, thumb(member.image));
      for (const [name, value] of member.fields) card.append(el("div", {}, name + ": " + value));
      members.append(card);
    }
    const more = group.size > group.members.length
      ? " (" + group.members.length + " shown)" : "";
    groups.append(el("div", {class: "group"},
      el("div", {}, "group " + group.id + ": " + group.size + " rows" + more), members));
  }
  applyThreshold();
}
threshold.addEventListener("input", applyThreshold);
order.addEventListener("change", render);
render();
document.body.dataset.ready = "1";
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _json_for_script(value: object) -> str:
    """JSON that cannot end its <script> element early (`</script>`, `<!--`)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render_page(data: dict, header: list[str], warnings: list[str], failures: list) -> str:
    """The whole page: `data` for the script, `header` lines, warnings, and the failed rows
    of each source (`(name, counts, examples as (row id, url, status, error))`)."""
    csp = (
        "default-src 'none'; img-src data: 'self'; "
        f"style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SCRIPT)}; "
        "base-uri 'none'; form-action 'none'"
    )
    esc = html.escape
    lines = "".join(f'<div class="meta">{esc(line)}</div>' for line in header)
    warned = "".join(f'<div class="warn">{esc(line)}</div>' for line in warnings)
    failed = []
    for name, counts, examples in failures:
        counted = ", ".join(f"{esc(status)} {count}" for status, count in counts.items())
        failed.append(f"<h3>{esc(name)}: {counted or 'no failed rows'}</h3>")
        if examples:
            rows = "".join(
                "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in example) + "</tr>"
                for example in examples
            )
            failed.append(
                "<table><tr><th>row</th><th>url</th><th>status</th><th>error</th></tr>"
                f"{rows}</table>"
            )
    slider = data["slider"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(data["title"])}</title>
<style>{STYLE}</style></head>
<body>
<header><h1>{esc(data["title"])}</h1>{lines}{warned}</header>
<section>
<h2>Similarities</h2>
<svg id="histogram" width="600" height="160" role="img"
 aria-label="histogram of similarities"></svg>
<div class="note">orange: the kept pairs; grey: {esc(data["histogram"]["sampleLabel"])};
red line: the threshold below</div>
<div class="controls">
<label>threshold <input type="range" id="threshold" min="{slider["min"]}"
 max="{slider["max"]}" step="0.001" value="{slider["value"]}"></label>
<span id="threshold-value"></span>
<span><span id="visible">0</span> of {data["shownCount"]} shown pairs at or above it</span>
<label>order <select id="order"><option value="desc">most similar first</option>
<option value="asc">least similar first</option></select></label>
</div>
<h2>Borderline: just above and just below the threshold</h2>
<div class="note">{esc(data["borderlineNote"])}</div>
<div class="grid" id="borderline-pairs"></div>
<h2>Pairs</h2>
<div class="note">{esc(data["pairsNote"])}</div>
<div class="grid" id="pairs"></div>
<h2>Groups</h2>
<div class="note">{esc(data["groupsNote"])}</div>
<div id="groups"></div>
<h2>Rows that gave no features</h2>
{"".join(failed)}
</section>
<script type="application/json" id="imgsim-data">{_json_for_script(data)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
