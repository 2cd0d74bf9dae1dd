// The try-it page: one photo, two calls to the classify API (center crop, then the chosen
// MID policy with the same seed), the views drawn on the photo, top-5 side by side.
// Plain script, no framework, no network beyond this server.
"use strict";

(() => {
  // Colour and line style per view kind; mirrored kinds are dashed so that a mirrored
  // view on the same box as its unmirrored twin still lets the twin show through.
  const KINDS = {
    center: { name: "center", color: "#ff2d55", width: 7, dash: [] },
    fixed: { name: "fixed", color: "#ffcc00", width: 3, dash: [] },
    mfixed: { name: "mirrored fixed", color: "#ff7f0e", width: 3, dash: [10, 6] },
    random: { name: "random", color: "#00c8ff", width: 2, dash: [] },
    mrandom: { name: "mirrored random", color: "#7cfc00", width: 2, dash: [8, 6] },
    full: { name: "whole image", color: "#c77dff", width: 5, dash: [] },
    mfull: { name: "mirrored whole image", color: "#9d4edd", width: 5, dash: [14, 8] },
  };
  // "full@288" -> "full": a kind may carry the resolution it is classified at
  const baseKind = (kind) => kind.split("@")[0];
  const sizeOf = (kind) => (kind.includes("@") ? ` at ${kind.split("@")[1]} px` : "");
  const styleOf = (kind) => KINDS[baseKind(kind)] || KINDS.random;
  const STAGES = ["decode", "preprocess", "queue_wait", "forward", "postprocess"];
  const TOKEN_KEY = "midserve.token";
  const MAX_W = 600;
  const MAX_H = 560;
  const MAX_UPSCALE = 4;

  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") node.className = v;
      else if (k === "data") Object.assign(node.dataset, v);
      else if (k === "style") Object.assign(node.style, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  };

  const state = {
    file: null,
    models: new Map(),
    runId: 0,
    image: null, // decoded photo (HTMLImageElement) or null when the browser cannot show it
    views: [], // MID views: {index, kind, flip, box, top1}
    scale: { x: 1, y: 1 },
    hovered: -1,
    viewsEdited: false,
  };

  class ApiError extends Error {
    constructor(status, type, message) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  // ---------------------------------------------------------------- API calls

  function authHeaders() {
    const token = $("token").value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function readError(resp) {
    let body = null;
    try {
      body = await resp.json();
    } catch {
      body = null;
    }
    if (body && body.error && typeof body.error.message === "string") {
      return new ApiError(resp.status, body.error.type || "error", body.error.message);
    }
    return new ApiError(resp.status, "http_error", `${resp.status} ${resp.statusText}`);
  }

  async function fetchJson(url, init) {
    let resp;
    try {
      resp = await fetch(url, init);
    } catch (err) {
      throw new ApiError(0, "network_error", `could not reach the server (${err.message})`);
    }
    if (!resp.ok) throw await readError(resp);
    return resp.json();
  }

  async function classify(model, file, params) {
    const form = new FormData();
    form.append("images", file, file.name || "upload");
    const query = new URLSearchParams(params).toString();
    const url = `/v1/models/${encodeURIComponent(model)}/classify?${query}`;
    const started = performance.now();
    const body = await fetchJson(url, { method: "POST", body: form, headers: authHeaders() });
    const roundTrip = performance.now() - started;
    const result = body.results[0];
    if (result.error) throw new ApiError(200, result.error.type, result.error.message);
    return { result, total: body.timings_ms.total, roundTrip };
  }

  // ---------------------------------------------------------------- models

  async function loadModels() {
    let list;
    try {
      list = await fetchJson("/v1/models", { headers: authHeaders() });
    } catch (err) {
      showError(err);
      if (err.status === 401) $("auth").open = true;
      return;
    }
    clearError();
    const select = $("model");
    const previous = select.value;
    select.replaceChildren();
    state.models.clear();
    let loading = false;
    for (const m of list.models) {
      state.models.set(m.name, m);
      const ready = m.state === "ready";
      loading ||= m.state === "loading" || m.state === "pending";
      const text = ready ? m.name : `${m.name} (${m.state})`;
      const title = m.error || m.description || "";
      select.append(el("option", { value: m.name, textContent: text, disabled: !ready, title }));
    }
    if (!list.models.length) showError(new ApiError(0, "no_models", "the server serves no model"));
    const firstReady = list.models.find((m) => m.state === "ready");
    if (state.models.get(previous)?.state === "ready") select.value = previous;
    else if (firstReady) select.value = firstReady.name;
    onModelChange();
    if (loading) setTimeout(loadModels, 2000);
  }

  function onModelChange() {
    const m = state.models.get($("model").value);
    if (!m) {
      $("model-info").textContent = "";
      updateRunButton();
      return;
    }
    $("model-info").textContent =
      `${m.arch}: ${m.input_size} px views of the photo resized to ${m.resize_size} px, ` +
      `${m.num_classes} classes`;
    if (!state.viewsEdited) $("views").value = m.default_views;
    $("views").placeholder = m.default_views;
    $("level").value = m.default_level;
    $("crops").max = String(m.limits.max_views_per_request);
    updateRunButton();
  }

  // ---------------------------------------------------------------- running

  function midParams() {
    if ($("mode-crops").checked) return { crops: $("crops").value.trim() };
    return { views: $("views").value.trim() || $("views").placeholder };
  }

  function currentSeed() {
    let text = $("seed").value.trim();
    if (text === "") {
      text = String(Math.floor(Math.random() * 2147483647));
      $("seed").value = text;
    }
    return text;
  }

  async function run() {
    const file = state.file;
    const model = $("model").value;
    if (!file || !model) return;
    const id = ++state.runId;
    const level = $("level").value;
    const seed = currentSeed();
    const common = { level, top_k: "5", seed };
    clearError();
    $("result").hidden = true;
    setStatus(`classifying ${file.name || "the photo"} with ${model}: center crop…`);
    const photo = decodePhoto(file);
    try {
      const center = await classify(model, file, { views: "center", ...common });
      if (id !== state.runId) return;
      setStatus(`classifying ${file.name || "the photo"} with ${model}: MID views…`);
      const mid = await classify(model, file, { ...midParams(), ...common });
      if (id !== state.runId) return;
      state.image = await photo;
      render(model, center, mid);
      const secs = (center.roundTrip + mid.roundTrip) / 1000;
      setStatus(`done in ${secs.toFixed(2)} s (seed ${mid.result.seed})`);
    } catch (err) {
      if (id !== state.runId) return;
      setStatus("");
      showError(err);
      if (err.status === 401) $("auth").open = true;
    }
  }

  function decodePhoto(file) {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.src = url;
    return img.decode().then(
      () => img,
      () => null, // the server may read formats this browser cannot show
    );
  }

  // ---------------------------------------------------------------- rendering

  function render(model, center, mid) {
    const r = mid.result;
    state.views = r.view_boxes.map((v, i) => ({ index: i, ...v, top1: r.view_top1[i] }));
    state.hovered = -1;
    $("result").hidden = false;
    sizeCanvas();
    draw();
    renderLegend(r.view_boxes);
    $("summary").textContent = state.image
      ? `${state.image.naturalWidth} × ${state.image.naturalHeight} px; ${r.views} MID views, ` +
        `seed ${r.seed}. Hover a box for that view's top-1.`
      : "This browser cannot display the photo's format; the boxes are listed below.";
    const c = center.result;
    $("center-caption").textContent = `1 view (${c.spec}), ${model}`;
    $("mid-caption").textContent =
      `${r.views} views (${r.spec}), ${r.level} averaging, ` +
      `${r.view_equivalents} view-equivalents, ${Math.round(100 * r.agreement)} % of views agree`;
    $("stages").textContent = stagesText(r.stages, r.answered_by);
    fillTop($("top-center"), c.top, null);
    fillTop($("top-mid"), r.top, c.top[0]);
    fillTimings(center, mid);
    fillViewList();
  }

  // a staged policy's answer says which stages ran, on which model (a cascade runs later
  // stages on others), what each gate saw, and the models whose views the answer averages
  function stagesText(stages, answeredBy) {
    if (!stages) return "";
    const text = stages
      .map((s, i) => {
        const on = s.model ? ` on ${s.model}` : "";
        const gate = s.gate ? ` if ${s.gate}` : "";
        const seen = s.signal === null || s.signal === undefined ? "" : ` (saw ${s.signal})`;
        return `stage ${i + 1}: ${s.spec}${on}${gate}${seen}: ${s.ran ? "ran" : "skipped"}`;
      })
      .join("; ");
    return answeredBy && answeredBy.length ? `${text}; answered by ${answeredBy.join("+")}` : text;
  }

  function sizeCanvas() {
    const canvas = $("canvas");
    const img = state.image;
    // Without the photo, the boxes' extent stands in for its size (fixed crops touch its sides).
    const extent = (i) => Math.max(1, ...state.views.map((v) => v.box[i]));
    const w = img ? img.naturalWidth : extent(2);
    const h = img ? img.naturalHeight : extent(3);
    const room = Math.min(MAX_W, canvas.parentElement.clientWidth || MAX_W);
    const scale = Math.min(room / w, MAX_H / h, MAX_UPSCALE);
    const cssW = Math.max(1, Math.round(w * scale));
    const cssH = Math.max(1, Math.round(h * scale));
    const dpr = window.devicePixelRatio || 1;
    canvas.style.width = `${cssW}px`;
    canvas.style.height = `${cssH}px`;
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
    state.scale = { x: cssW / w, y: cssH / h, dpr };
  }

  function draw() {
    const canvas = $("canvas");
    const ctx = canvas.getContext("2d");
    const { x: sx, y: sy, dpr } = state.scale;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const cssW = canvas.width / dpr;
    const cssH = canvas.height / dpr;
    ctx.clearRect(0, 0, cssW, cssH);
    if (state.image) ctx.drawImage(state.image, 0, 0, cssW, cssH);
    else {
      ctx.fillStyle = "#333";
      ctx.fillRect(0, 0, cssW, cssH);
    }
    const hovering = state.hovered >= 0;
    for (const v of state.views) {
      ctx.globalAlpha = hovering && v.index !== state.hovered ? 0.3 : 1;
      strokeBox(ctx, v, sx, sy);
    }
    ctx.globalAlpha = 1;
    if (hovering) {
      const v = state.views[state.hovered];
      const [x0, y0, x1, y1] = v.box;
      ctx.fillStyle = "rgba(255,255,255,0.18)";
      ctx.fillRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
      strokeBox(ctx, v, sx, sy, 2);
    }
  }

  // The stroke lies inside the box on whole pixels, so box edges at the photo's border show.
  function strokeBox(ctx, v, sx, sy, extra = 0) {
    const style = styleOf(v.kind);
    const lw = style.width + extra;
    const x0 = Math.round(v.box[0] * sx);
    const y0 = Math.round(v.box[1] * sy);
    const x1 = Math.round(v.box[2] * sx);
    const y1 = Math.round(v.box[3] * sy);
    ctx.lineWidth = lw;
    ctx.strokeStyle = style.color;
    ctx.setLineDash(style.dash);
    ctx.strokeRect(x0 + lw / 2, y0 + lw / 2, Math.max(0, x1 - x0 - lw), Math.max(0, y1 - y0 - lw));
    ctx.setLineDash([]);
  }

  function renderLegend(boxes) {
    const counts = {};
    for (const b of boxes) counts[baseKind(b.kind)] = (counts[baseKind(b.kind)] || 0) + 1;
    const legend = $("legend");
    legend.replaceChildren();
    for (const [kind, style] of Object.entries(KINDS)) {
      const n = counts[kind] || 0;
      const swatch = el("span", {
        class: style.dash.length ? "swatch dashed" : "swatch",
        style: { backgroundColor: style.color, borderColor: style.color },
      });
      legend.append(
        el(
          "li",
          { class: n ? "" : "absent", data: { kind, count: String(n) } },
          swatch,
          `${style.name} ×${n}`,
        ),
      );
    }
  }

  const pct = (p) => `${(p * 100).toFixed(1)}%`;

  function fillTop(table, top, centerTop1) {
    const body = table.tBodies[0];
    body.replaceChildren();
    top.forEach((t, i) => {
      const bar = el("div", { class: "bar", style: { width: `${Math.max(0.5, t.prob * 100)}%` } });
      const row = el(
        "tr",
        { data: { index: String(t.index), synset: t.synset, prob: String(t.prob) } },
        el("td", { class: "rank", textContent: String(i + 1) }),
        el("td", { class: "name", title: `${t.label} (${t.synset}, class ${t.index})` },
          el("span", { class: "label", textContent: t.label }),
          el("small", { textContent: t.synset === t.label ? `class ${t.index}` : t.synset })),
        el("td", { class: "prob" }, el("div", { class: "track" }, bar),
          el("span", { textContent: pct(t.prob) })),
      );
      body.append(row);
    });
    if (centerTop1 && top.length) {
      const same = top[0].index === centerTop1.index;
      body.rows[0].classList.add(same ? "agree" : "changed");
      const note = same
        ? "MID keeps the center crop's top-1."
        : `MID changes the top-1 from “${centerTop1.label}”.`;
      body.append(el("tr", { class: "note" }, el("td", { colSpan: 3, textContent: note })));
    }
  }

  function fillTimings(center, mid) {
    const body = $("timings").tBodies[0];
    body.replaceChildren();
    const fmt = (v) => (typeof v === "number" ? v.toFixed(1) : "–");
    const keys = [...STAGES];
    for (const k of [...Object.keys(center.result.timings_ms), ...Object.keys(mid.result.timings_ms)]) {
      if (!keys.includes(k)) keys.push(k);
    }
    const rows = keys.map((k) => [k, center.result.timings_ms[k], mid.result.timings_ms[k]]);
    rows.push(["server total", center.total, mid.total]);
    rows.push(["browser round trip", center.roundTrip, mid.roundTrip]);
    for (const [name, a, b] of rows) {
      body.append(
        el("tr", { data: { stage: name } },
          el("td", { textContent: name.replace("_", " ") }),
          el("td", { textContent: fmt(a) }),
          el("td", { textContent: fmt(b) })),
      );
    }
  }

  function fillViewList() {
    const body = $("view-list").tBodies[0];
    body.replaceChildren();
    for (const v of state.views) {
      const style = styleOf(v.kind);
      const row = el(
        "tr",
        { data: { view: String(v.index), kind: v.kind } },
        el("td", { textContent: String(v.index + 1) }),
        el("td", {}, el("span", { class: "dot", style: { backgroundColor: style.color } }),
          ` ${style.name}`),
        el("td", { textContent: `[${v.box.join(", ")}]` }),
        el("td", { textContent: `${v.top1.label} ${pct(v.top1.prob)}` }),
      );
      row.addEventListener("mouseenter", () => {
        const [x0, y0, x1, y1] = v.box;
        hover(v.index, ((x0 + x1) / 2) * state.scale.x, ((y0 + y1) / 2) * state.scale.y);
      });
      row.addEventListener("mouseleave", () => hover(-1));
      body.append(row);
    }
  }

  // ---------------------------------------------------------------- hover

  // The view under the pointer: among the boxes that contain it, the one whose centre is
  // nearest (boxes overlap a lot); equal boxes go to the first view.
  function viewAt(px, py) {
    const x = px / state.scale.x;
    const y = py / state.scale.y;
    let best = -1;
    let bestDist = Infinity;
    for (const v of state.views) {
      const [x0, y0, x1, y1] = v.box;
      if (x < x0 || x > x1 || y < y0 || y > y1) continue;
      const d = Math.hypot((x0 + x1) / 2 - x, (y0 + y1) / 2 - y);
      if (d < bestDist) {
        best = v.index;
        bestDist = d;
      }
    }
    return best;
  }

  function hover(index, cssX, cssY) {
    const tip = $("tip");
    const rows = $("view-list").tBodies[0].rows;
    if (state.hovered >= 0 && rows[state.hovered]) rows[state.hovered].classList.remove("hot");
    state.hovered = index;
    draw();
    if (index < 0) {
      tip.hidden = true;
      return;
    }
    if (rows[index]) rows[index].classList.add("hot");
    const v = state.views[index];
    const style = styleOf(v.kind);
    tip.replaceChildren(
      el("div", { class: "tip-head" },
        el("span", { class: "dot", style: { backgroundColor: style.color } }),
        ` view ${index + 1} of ${state.views.length}: ${style.name}${sizeOf(v.kind)}`),
      el("div", {}, "top-1: ", el("strong", { textContent: v.top1.label }),
        ` ${pct(v.top1.prob)}`),
    );
    tip.dataset.view = String(index);
    tip.dataset.kind = v.kind;
    tip.dataset.top1 = String(v.top1.index);
    const canvas = $("canvas");
    tip.hidden = false;
    const left = Math.min(cssX + 14, canvas.clientWidth - tip.offsetWidth);
    const top = cssY + 14 + tip.offsetHeight > canvas.clientHeight ? cssY - tip.offsetHeight - 8 : cssY + 14;
    tip.style.left = `${canvas.offsetLeft + Math.max(0, left)}px`;
    tip.style.top = `${canvas.offsetTop + Math.max(0, top)}px`;
  }

  function onCanvasMove(event) {
    if (!state.views.length) return;
    const rect = $("canvas").getBoundingClientRect();
    const x = event.clientX - rect.left;
    const y = event.clientY - rect.top;
    const index = viewAt(x, y);
    if (index !== state.hovered || index >= 0) hover(index, x, y);
  }

  // ---------------------------------------------------------------- status and errors

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(err) {
    const box = $("error");
    const status = err.status ? ` (HTTP ${err.status})` : "";
    box.replaceChildren(
      el("strong", { class: "error-type", textContent: `${err.type || "error"}${status}` }),
      ": ",
      el("span", { class: "error-message", textContent: err.message }),
    );
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  // ---------------------------------------------------------------- wiring

  function updateRunButton() {
    const m = state.models.get($("model").value);
    $("run").disabled = !(state.file && m && m.state === "ready");
  }

  function chooseFile(file) {
    if (!file) return;
    state.file = file;
    const size = file.size < 1024 ? `${file.size} B` : `${Math.round(file.size / 1024)} KiB`;
    $("file-name").textContent = `${file.name || "pasted image"} (${size})`;
    updateRunButton();
    if (!$("run").disabled) run();
  }

  function wire() {
    $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
    $("token").addEventListener("change", () => {
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      loadModels();
    });
    $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
    const drop = $("drop");
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (e) => {
        e.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const name of ["dragleave", "drop"]) {
      drop.addEventListener(name, () => drop.classList.remove("over"));
    }
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      chooseFile(e.dataTransfer.files[0]);
    });
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData?.files || [])][0];
      if (item) chooseFile(item);
    });
    $("model").addEventListener("change", onModelChange);
    $("views").addEventListener("input", () => {
      state.viewsEdited = true;
      $("mode-views").checked = true;
    });
    $("crops").addEventListener("input", () => {
      $("mode-crops").checked = true;
    });
    $("new-seed").addEventListener("click", () => {
      $("seed").value = "";
      currentSeed();
    });
    $("controls").addEventListener("submit", (e) => {
      e.preventDefault();
      run();
    });
    const canvas = $("canvas");
    canvas.addEventListener("mousemove", onCanvasMove);
    canvas.addEventListener("mouseleave", () => hover(-1));
    window.addEventListener("resize", () => {
      if (!$("result").hidden) {
        sizeCanvas();
        draw();
      }
    });
    currentSeed();
    loadModels();
  }

  wire();
})();
