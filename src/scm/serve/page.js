// scm serve: the page. Every input event asks the server for new images (one request per model); only the newest
// response of each model is shown. The server drops a request that a newer one from this page (the same client id)
// replaces before it starts (409), so while a slider moves the images follow as fast as the model generates.
// A text model gets a prompt box (#prompt, with example prompts from /api/info as suggestions).
// A video model's answer is an animated GIF, shown (and played) by the same <img>; an audio model's is JSON: its
// spectrogram goes to the <img>, its clips (WAV) to one <audio> player each in #student-audio / #teacher-audio.
// Stable element ids for tests: #seed #seed-number #prompt #class #steps #guidance #batch, #student-img (its data-seq
// counts the images shown), #student-ms (ms per image, a plain number), #student-ips, #teacher-img, #teacher-ms.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SEED_SLIDER_MAX = 999;
  let info = null;
  let seedMax = 2147483647;

  function makeClientId() {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return "page-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  const client = makeClientId();

  // One panel per model: requests sent, the newest shown, the ones still in flight (to abort once stale).
  const panels = {};
  function panel(name) {
    return { name, sent: 0, shown: 0, inflight: new Map(), lastQuery: null, url: null, msPerImage: null };
  }

  function fmt(x) {
    if (!isFinite(x)) return String(x);
    return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
  }

  function seedValue() {
    const n = Number($("seed-number").value);
    return Number.isInteger(n) && n >= 0 && n <= seedMax ? n : null;
  }

  function query(name) {
    const m = info[name];
    const p = new URLSearchParams({ model: name, client, seed: String(seedValue()), batch: $("batch").value });
    if (name === "student") p.set("steps", $("steps").value);
    if (m.conditioning === "text") p.set("prompt", $("prompt").value);
    if (m.classes && $("class").value !== "") p.set("class", $("class").value);
    if (m.guidance) p.set("guidance", Number($("guidance").value).toFixed(1));
    return p.toString();
  }

  function showError(name, message) {
    const el = $(name + "-error");
    el.textContent = message || "";
    el.hidden = !message;
  }

  function bytesOf(base64) {
    return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  }

  // An audio answer: its spectrogram PNG (returned, for the <img>) and one <audio> player per WAV clip.
  async function audioParts(name, p, blob) {
    const body = JSON.parse(await blob.text());
    for (const u of p.clipUrls || []) URL.revokeObjectURL(u);
    p.clipUrls = body.clips.map((c) => URL.createObjectURL(new Blob([bytesOf(c)], { type: "audio/wav" })));
    const players = p.clipUrls.map((u, i) => {
      const a = document.createElement("audio");
      a.controls = true;
      a.preload = "auto";
      a.src = u;
      a.title = `clip ${i} (${body.length} samples at ${body.sample_rate} Hz)`;
      return a;
    });
    $(name + "-audio").replaceChildren(...players);
    $(name + "-audio").hidden = false;
    return new Blob([bytesOf(body.spectrogram)], { type: "image/png" });
  }

  async function display(name, p, blob, headers) {
    const img = $(name + "-img");
    if ((headers.get("Content-Type") || "").startsWith("application/json")) blob = await audioParts(name, p, blob);
    const url = URL.createObjectURL(blob);
    const ms = Number(headers.get("X-Ms-Per-Image"));
    const ips = Number(headers.get("X-Images-Per-Second"));
    const nfe = headers.get("X-NFE");
    return new Promise((resolve) => {
      img.onload = img.onerror = () => {
        if (p.url && p.url !== url) URL.revokeObjectURL(p.url);
        p.url = url;
        p.msPerImage = ms;
        $(name + "-ms").textContent = fmt(ms);
        $(name + "-ips").textContent = fmt(ips);
        $(name + "-nfe").textContent = `(${nfe} NFE, ${headers.get("X-Images")} image${headers.get("X-Images") === "1" ? "" : "s"})`;
        img.dataset.seq = String(Number(img.dataset.seq || "0") + 1);
        showError(name, "");
        updateSpeedup();
        resolve();
      };
      img.src = url;
    });
  }

  function updateSpeedup() {
    const s = panels.student, t = panels.teacher;
    if (!t || !s.msPerImage || !t.msPerImage) return;
    $("speedup-value").textContent = fmt(t.msPerImage / s.msPerImage);
    $("speedup").hidden = false;
  }

  async function request(name) {
    const p = panels[name];
    if (seedValue() === null) {
      showError(name, `seed: an integer in 0..${seedMax}`);
      return;
    }
    const q = query(name);
    if (q === p.lastQuery) return; // nothing this model depends on has changed
    p.lastQuery = q;
    const seq = ++p.sent;
    const controller = new AbortController();
    p.inflight.set(seq, controller);
    try {
      const r = await fetch("/api/generate?" + q, { signal: controller.signal, cache: "no-store" });
      if (r.status === 409) return; // dropped by the server: a newer request of this page replaced it
      if (!r.ok) {
        const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
        if (p.lastQuery === q) p.lastQuery = null; // the same settings may be asked again
        if (seq > p.shown) {
          p.shown = seq;
          showError(name, body.error);
        }
        return;
      }
      const blob = await r.blob();
      if (seq <= p.shown) return; // a newer response is already shown
      p.shown = seq;
      for (const [s, c] of p.inflight) { // older requests can only bring stale images
        if (s < seq) {
          c.abort();
          p.inflight.delete(s);
        }
      }
      await display(name, p, blob, r.headers);
    } catch (e) {
      if (e.name !== "AbortError" && seq > p.shown) {
        if (p.lastQuery === q) p.lastQuery = null;
        showError(name, String(e));
      }
    } finally {
      p.inflight.delete(seq);
    }
  }

  function update() {
    for (const name of Object.keys(panels)) request(name);
  }

  function option(value, text) {
    const o = document.createElement("option");
    o.value = String(value);
    o.textContent = text;
    return o;
  }

  function describe(m) {
    const sampler = m.steps_kind === "nfe" ? `Heun ODE` : `consistency`;
    if (m.modality === "video") {
      return `${m.method}, ${sampler}, ${m.frames} frames of ${m.height}×${m.width}×${m.channels} at ${m.fps} fps`;
    }
    if (m.modality === "audio") {
      return `${m.method}, ${sampler}, ${m.length} samples × ${m.channels} at ${m.sample_rate} Hz`;
    }
    return `${m.method}, ${sampler}, ${m.height}×${m.width}×${m.channels}${m.latent ? " (latent)" : ""}`;
  }

  function build() {
    const s = info.student, t = info.teacher;
    seedMax = info.seed_max;
    $("seed-number").max = String(seedMax);
    $("seed").max = String(SEED_SLIDER_MAX);
    $("model-desc").textContent = `student: ${s.run} (${describe(s)}, step ${s.checkpoint_step})` +
      (t ? ` · teacher: ${t.run} (${describe(t)}, ${t.steps[0]} NFE)` : "");
    $("student-desc").textContent = describe(s);
    if (s.modality === "audio") document.body.classList.add("audio");
    panels.student = panel("student");
    if (t) {
      $("teacher-desc").textContent = `Heun ODE, ${t.steps[0]} NFE`;
      $("teacher-panel").hidden = false;
      panels.teacher = panel("teacher");
    }
    $("steps-label").textContent = s.steps_kind === "nfe" ? "NFE" : "steps";
    for (const k of s.steps) $("steps").append(option(k, String(k)));
    $("steps").value = String(s.default_steps);
    if (s.conditioning === "text") {
      $("prompt").maxLength = s.prompt_max_chars;
      $("prompt").value = s.example_prompts.length ? s.example_prompts[0] : "";
      $("prompt-examples").replaceChildren(...s.example_prompts.map((e) => option(e, e)));
      $("prompt-row").hidden = false;
    }
    if (s.classes) {
      $("class").append(option("", `all (image i: class i mod ${s.classes})`));
      s.class_names.forEach((n, i) => $("class").append(option(i, n === String(i) ? n : `${i}: ${n}`)));
      $("class-row").hidden = false;
    }
    if (s.guidance || (t && t.guidance)) {
      const range = s.guidance ? s.guidance_range : t.guidance_range; // what the server accepts
      const g = range.default;
      $("guidance").max = String(range.max);
      $("guidance").value = String(g);
      $("guidance-value").textContent = Number(g).toFixed(1);
      $("guidance-row").hidden = false;
    }
    const tiled = s.modality !== "audio"; // audio clips are listed, images and video clips tiled
    $("batch").replaceChildren(...s.batches.map((b) => option(b, b === 1 || !tiled ? String(b) : `${b} (${Math.sqrt(b)} × ${Math.sqrt(b)})`)));
    if (s.modality === "video" || s.modality === "audio") document.querySelector("label[for=batch]").textContent = "clips";
  }

  function wire() {
    $("seed").addEventListener("input", () => {
      $("seed-number").value = $("seed").value;
      update();
    });
    $("seed-number").addEventListener("input", () => {
      const v = seedValue();
      if (v !== null) $("seed").value = String(Math.min(v, SEED_SLIDER_MAX));
      update();
    });
    $("seed-random").addEventListener("click", () => {
      const v = Math.floor(Math.random() * (SEED_SLIDER_MAX + 1));
      $("seed").value = $("seed-number").value = String(v);
      update();
    });
    $("guidance").addEventListener("input", () => {
      $("guidance-value").textContent = Number($("guidance").value).toFixed(1);
      update();
    });
    for (const id of ["prompt", "class", "steps", "batch"]) $(id).addEventListener("input", update);
    $("controls").addEventListener("submit", (e) => e.preventDefault());
  }

  async function start() {
    try {
      const r = await fetch("/api/info", { cache: "no-store" });
      info = await r.json();
    } catch (e) {
      $("model-desc").textContent = `cannot reach the server: ${e}`;
      return;
    }
    build();
    wire();
    update();
  }

  start();
})();
