// The wsi-sampler viewer: slides from /v1/slides, DeepZoom tiles through OpenSeadragon
// (served by this service from its npm package), overlays from the same API. Plain JS.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const state = { id: null, info: null, viewer: null, layers: {}, fetched: {} };
  window.wsiViewer = state; // for the browser tests and the curious
  const LAYERS = ["tissue", "qc", "predictions", "medgemma", "attention"];
  state.tilesLoaded = 0;

  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem("wsiApiKey") || "";
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem("wsiApiKey", keyInput.value);
    if (state.viewer) state.viewer.setAjaxHeaders(authHeaders());
    listSlides();
    loadSlideModels();  // a key may be what they needed
  });

  function authHeaders() {
    return keyInput.value ? { Authorization: `Bearer ${keyInput.value}` } : {};
  }

  async function api(path, options = {}) {
    const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    if (!resp.ok) {
      let reason = `${resp.status} ${resp.statusText}`;
      try { reason = (await resp.json()).error || reason; } catch (_) { /* not JSON */ }
      throw new Error(reason);
    }
    return resp;
  }

  function showError(text) {
    const box = $("message");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function sizeText(bytes) {
    if (bytes == null) return "";
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (bytes >= 1000 && i < units.length - 1) { bytes /= 1000; i += 1; }
    return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  async function listSlides() {
    try {
      const body = await (await api("/v1/slides?limit=1000")).json();
      const list = $("slides");
      list.replaceChildren();
      for (const item of body.items) {
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.slide = item.id;
        button.textContent = item.name;
        const detail = document.createElement("small");
        detail.textContent = `${item.source} · ${item.format} · ${sizeText(item.size_bytes)}`;
        button.append(detail);
        button.addEventListener("click", () => openSlide(item.id));
        const li = document.createElement("li");
        li.append(button);
        if (item.uploaded) li.append(deleteButton(item));
        list.append(li);
      }
      const wanted = new URLSearchParams(location.search).get("slide");
      if (wanted && state.id === null) openSlide(wanted);
    } catch (err) {
      showError(`The slides could not be listed: ${err.message}`);
    }
  }

  // an upload's delete button (slides in the configured roots are not the service's to delete)
  function deleteButton(item) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "delete";
    button.textContent = "Delete";
    button.setAttribute("aria-label", `Delete the upload ${item.name}`);
    button.addEventListener("click", async () => {
      if (!window.confirm(`Delete the upload ${item.name} from the service?`)) return;
      try {
        await api(`/v1/slides/${encodeURIComponent(item.id)}`, { method: "DELETE" });
        if (state.id === item.id) closeSlide();
        $("upload-status").textContent = `Deleted ${item.name}`;
        await listSlides();
      } catch (err) {
        showError(`${item.name} was not deleted: ${err.message}`);
      }
    });
    return button;
  }

  function closeSlide() {
    clearLayers();
    if (state.viewer) state.viewer.close();
    state.id = null;
    state.info = null;
    $("info").replaceChildren();
    $("downloads").replaceChildren();
    $("layers").disabled = true;
    $("describe").disabled = true;
    $("job-start").disabled = true;
    $("answer").disabled = true;
    history.replaceState(null, "", location.pathname);
  }

  // -- upload: the raw file (POST /v1/slides?name=), with its progress; then it is opened ----
  function uploadSlide(file) {
    const bar = $("upload-progress"), status = $("upload-status");
    showError("");
    bar.value = 0;
    bar.hidden = false;
    status.textContent = `Uploading ${file.name} (${sizeText(file.size)})…`;
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/slides?name=${encodeURIComponent(file.name)}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) bar.value = e.loaded / e.total;
    });
    const done = (text) => { bar.hidden = true; status.textContent = text; $("upload").value = ""; };
    xhr.addEventListener("load", async () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status < 200 || xhr.status >= 300) {
        done("");
        showError(`${file.name} was not uploaded: ${body.error || xhr.statusText} (HTTP ${xhr.status})`);
        return;
      }
      done(`Uploaded ${body.name}`);
      await listSlides();
      openSlide(body.id);
    });
    xhr.addEventListener("error", () => {
      done("");
      showError(`${file.name} was not uploaded: the connection broke (a file over the `
        + "service's max_upload_mb is refused before it is read)");
    });
    xhr.send(file);
  }
  $("upload").addEventListener("change", (e) => {
    const file = e.target.files && e.target.files[0];
    if (file) uploadSlide(file);
  });

  function makeViewer() {
    const viewer = OpenSeadragon({
      id: "osd", prefixUrl: "/viewer/osd/images/", loadTilesWithAjax: true,
      ajaxHeaders: authHeaders(), showNavigator: true, timeout: 60000,
      gestureSettingsMouse: { clickToZoom: false },
    });
    viewer.addHandler("open", onOpen);
    viewer.addHandler("open-failed", (e) => showError(`The slide could not be shown: ${e.message}`));
    viewer.addHandler("tile-loaded", () => { state.tilesLoaded += 1; });
    viewer.addHandler("tile-load-failed", (e) => showError(`A tile failed: ${e.message}`));
    viewer.addHandler("animation", updateScaleBar);
    viewer.addHandler("resize", updateScaleBar);
    new OpenSeadragon.MouseTracker({
      element: viewer.container,
      moveHandler: (e) => {
        const item = viewer.world.getItemAt(0);
        if (!item) return;
        const p = item.viewerElementToImageCoordinates(e.position);
        $("pointer").textContent = `x ${Math.round(p.x)}, y ${Math.round(p.y)} (level-0 px)`;
      },
    });
    return viewer;
  }

  async function openSlide(id) {
    showError("");
    clearLayers();
    try {
      const info = await (await api(`/v1/slides/${encodeURIComponent(id)}`)).json();
      const dzi = `/v1/slides/${encodeURIComponent(id)}/deepzoom.dzi?v=${encodeURIComponent(info.fingerprint)}`;
      state.id = id;
      state.info = info;
      history.replaceState(null, "", `?slide=${encodeURIComponent(id)}`);
      for (const b of document.querySelectorAll("#slides button")) {
        b.setAttribute("aria-current", String(b.dataset.slide === id));
      }
      renderInfo(info);
      renderDownloads(id);
      state.viewer = state.viewer || makeViewer();
      state.viewer.open(dzi);
    } catch (err) {
      state.id = id;
      showError(`Slide ${id} could not be opened: ${err.message}`);
    }
  }

  function onOpen() {
    $("layers").disabled = false;
    $("describe").disabled = false;
    $("job-start").disabled = false;
    $("answer").disabled = !state.slideModels || !state.slideModels.length;
    const item = state.viewer.world.getItemAt(0);
    item.addHandler("fully-loaded-change", (e) => { document.body.dataset.fullyLoaded = String(e.fullyLoaded); });
    updateScaleBar();
    for (const name of LAYERS) {
      if ($(`layer-${name}`).checked) toggleLayer(name, true);
    }
  }

  function renderInfo(info) {
    const rows = [["name", info.name], ["size", `${info.width} × ${info.height} px`],
      ["µm/px", info.mpp_x ? `${info.mpp_x.toFixed(4)} × ${info.mpp_y.toFixed(4)}` : "unknown"],
      ["levels", info.level_count], ["vendor", info.vendor || "–"], ["format", info.format]];
    const dl = $("info");
    dl.replaceChildren();
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
  }

  // -- tissue detection: the service's, or a classical method chosen here (tissue_method) ---
  function withMethod(body) {
    const method = $("tissue-method").value;
    return method ? { ...body, tissue_method: method } : body;
  }
  function methodQuery(sep) {
    const method = $("tissue-method").value;
    return method ? `${sep}tissue_method=${encodeURIComponent(method)}` : "";
  }
  // the layers shown are redrawn with the new method; the choice waits for them (a second
  // change while the first redraws would leave a layer of the first behind)
  $("tissue-method").addEventListener("change", async (e) => {
    if (state.id === null) return;
    renderDownloads(state.id);
    e.target.disabled = true;
    try {
      await Promise.all(["tissue", "qc", "predictions", "medgemma"]
        .filter((name) => $(`layer-${name}`).checked)
        .map((name) => { removeLayer(name); return toggleLayer(name, true); }));
    } finally {
      e.target.disabled = false;
    }
  });

  function renderDownloads(id) {
    const base = `/v1/slides/${encodeURIComponent(id)}`;
    const grid = { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(withMethod({ strategy: "grid", patch_size_px: 224, target_mpp: 0.5 })) };
    const items = [["Tissue (QuPath GeoJSON)", `${base}/tissue?format=geojson${methodQuery("&")}`,
      "tissue.geojson"],
      ["Tissue mask (PNG)", `${base}/tissue?format=png${methodQuery("&")}`, "tissue.png"],
      ["Thumbnail (PNG)", `${base}/thumbnail`, "thumbnail.png"],
      ["QC summary (JSON)", `${base}/qc${methodQuery("?")}`, "qc.json"],
      ["QC overlay (PNG)", `${base}/qc.png${methodQuery("?")}`, "qc.png"],
      ["QC classes (QuPath GeoJSON)", `${base}/qc.geojson${methodQuery("?")}`, "qc.geojson"],
      ["Patch grid, 224 px at 0.5 µm/px (CLAM/TRIDENT h5)", `${base}/plan.h5`, "coords.h5", grid]];
    state.downloads = items;
    const list = $("downloads");
    list.replaceChildren();
    for (const [label, url, file, options] of items) {
      const li = document.createElement("li");
      li.append(downloadButton(label, url, file, options));
      list.append(li);
    }
  }

  // a button that fetches `url` with the tab's key and saves the answer as `file`
  function downloadButton(label, url, file, options) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.addEventListener("click", async () => {
      try {
        const blob = await (await api(url, options || {})).blob();
        const a = document.createElement("a");
        a.href = URL.createObjectURL(blob); a.download = file; a.click();
      } catch (err) { showError(`${label}: ${err.message}`); }
    });
    return button;
  }

  // -- scale bar: a round length in µm, ~120 CSS px long, from the MPP and the zoom --------
  function updateScaleBar() {
    const item = state.viewer && state.viewer.world.getItemAt(0);
    const mpp = state.info && state.info.mpp_x;
    if (!item || !mpp) { $("scalebar").hidden = true; return; }
    $("scalebar").hidden = false;
    const screenPerImagePx = item.viewportToImageZoom(state.viewer.viewport.getZoom(true));
    const umPerScreenPx = mpp / screenPerImagePx;
    const target = 120 * umPerScreenPx;
    const power = 10 ** Math.floor(Math.log10(target));
    const nice = [5, 2, 1].map((m) => m * power).find((v) => v <= target) || power;
    const width = nice / umPerScreenPx;
    $("scalebar-bar").style.width = `${width}px`;
    $("scalebar-label").textContent = nice >= 1000 ? `${nice / 1000} mm` : `${nice} µm`;
    state.scale = { um: nice, px: width };
  }

  // -- layers ---------------------------------------------------------------------------------
  // -- a job: the whole slide scored by the service's model, its result files to download --
  const RUNNING = ["queued", "running"];

  async function startJob() {
    const slide = state.id;
    $("job-start").disabled = true;
    try {
      const job = await (await api("/v1/jobs", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ slides: [slide], sampling: withMethod({}) }),
      })).json();
      state.job = { id: job.id, slide };
      await followJob(job.id);
    } catch (err) {
      showError(`The job could not be run: ${err.message}`);
    } finally {
      $("job-start").disabled = state.id === null;
    }
  }

  async function followJob(jobId) {
    for (;;) {
      if (!state.job || state.job.id !== jobId || state.job.slide !== state.id) return;
      const job = await (await api(`/v1/jobs/${encodeURIComponent(jobId)}`)).json();
      renderJob(job);
      if (!RUNNING.includes(job.state)) return;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  function renderJob(job) {
    const errors = job.errors.map((e) => e.message).join("; ");
    $("job-status").textContent = `${job.state}: ${job.slides_done} of ${job.slides_total} `
      + `slide(s), ${job.patches_done} patches${errors ? ` (${errors})` : ""}`;
    $("job-status").dataset.state = job.state;
    $("job-cancel").hidden = !RUNNING.includes(job.state);
    const list = $("job-results");
    list.replaceChildren();
    for (const result of job.results) {
      const prefix = `${result.slide_id}.`;  // the slide is the open one: its id is noise
      const label = result.name.startsWith(prefix) ? result.name.slice(prefix.length)
        : result.name;
      const button = downloadButton(label, result.url, result.name);
      button.dataset.name = result.name;
      button.dataset.url = result.url;
      const li = document.createElement("li");
      li.append(button);
      list.append(li);
    }
  }

  $("job-start").addEventListener("click", startJob);
  $("job-cancel").addEventListener("click", async () => {
    if (!state.job) return;
    try {
      await api(`/v1/jobs/${encodeURIComponent(state.job.id)}`, { method: "DELETE" });
    } catch (err) { showError(`The job could not be cancelled: ${err.message}`); }
  });

  function clearJob() {
    state.job = null;
    $("job-status").textContent = "";
    delete $("job-status").dataset.state;
    $("job-cancel").hidden = true;
    $("job-results").replaceChildren();
  }

  function clearLayers() {
    clearJob();  // a job keeps running on the service; this page follows the open slide's
    for (const name of Object.keys(state.layers)) removeLayer(name);
    state.fetched = {};
    state.answer = null;
    $("legend").hidden = true;
    $("qc-legend").hidden = true;
    $("answer-result").replaceChildren();
    $("answer-progress").textContent = "";
  }

  function removeLayer(name) {
    const layer = state.layers[name];
    if (!layer) return;
    if (layer.item) state.viewer.world.removeItem(layer.item);
    for (const el of layer.elements || []) state.viewer.removeOverlay(el);
    delete state.layers[name];
  }

  async function toggleLayer(name, on) {
    if (!on) {
      removeLayer(name);
      if (name === "predictions" || name === "attention") $("legend").hidden = true;
      if (name === "qc") $("qc-legend").hidden = true;
      return;
    }
    if (!state.viewer || !state.viewer.world.getItemAt(0)) return;
    try {
      if (name === "tissue") await addTissue();
      if (name === "qc") await addQc();
      if (name === "predictions") await addPredictions();
      if (name === "medgemma") await addMedGemma();
      if (name === "attention") await addAttention();
      setOpacity(name);
    } catch (err) {
      $(`layer-${name}`).checked = false;
      showError(`Layer "${name}" could not be drawn: ${err.message}`);
    }
  }

  function setOpacity(name) {
    const layer = state.layers[name];
    const value = Number($(`opacity-${name}`).value);
    if (!layer) return;
    if (layer.item) layer.item.setOpacity(value);
    for (const el of layer.elements || []) el.style.opacity = value;
  }

  // -- QC: what the exclusion removed, and the ink / dark / artefact classes it found -------
  async function addQc() {
    const id = state.id, base = `/v1/slides/${encodeURIComponent(id)}`;
    const [blob, qc] = await Promise.all([
      api(`${base}/qc.png?background=none${methodQuery("&")}`).then((r) => r.blob()),
      api(`${base}/qc${methodQuery("?")}`).then((r) => r.json())]);
    const url = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    });
    if (state.id !== id) return;
    await addImageLayer("qc", url, { qc });
    renderQcLegend(qc);
  }

  function renderQcLegend(qc) {
    const areas = { "removed by exclusion": qc.tissue_area_before_exclusion_mm2 - qc.tissue_area_mm2,
      ink: qc.pen_area_mm2, dark: qc.dark_area_mm2, ...qc.artifact_mm2 };
    const list = $("qc-legend");
    list.replaceChildren();
    for (const [label, colour] of Object.entries(qc.overlay_legend)) {
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour;
      const li = document.createElement("li");
      li.dataset.label = label;
      li.append(swatch, `${label}: ${(areas[label] || 0).toFixed(3)} mm²`);
      list.append(li);
    }
    const summary = document.createElement("li");
    summary.textContent = `tissue ${qc.tissue_area_mm2.toFixed(2)} mm², `
      + `${(100 * qc.excluded_share).toFixed(1)} % removed (${qc.artifact_detector})`;
    list.append(summary);
    for (const warning of qc.warnings) {
      const li = document.createElement("li");
      li.className = "warning";
      li.textContent = warning;
      list.append(li);
    }
    list.hidden = false;
  }

  async function addTissue() {
    const id = state.id;
    const blob = await (await api(
      `/v1/slides/${encodeURIComponent(id)}/tissue?format=png${methodQuery("&")}`)).blob();
    const bitmap = await createImageBitmap(blob);
    const canvas = document.createElement("canvas");
    canvas.width = bitmap.width; canvas.height = bitmap.height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(bitmap, 0, 0);
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    let area = 0;  // tissue pixels of the mask drawn (for the browser tests and the curious)
    for (let i = 0; i < pixels.data.length; i += 4) {
      const tissue = pixels.data[i] > 127;
      area += tissue;
      pixels.data.set(tissue ? [0, 200, 80, 255] : [0, 0, 0, 0], i);
    }
    ctx.putImageData(pixels, 0, 0);
    if (state.id !== id) return;
    await addImageLayer("tissue", canvas.toDataURL("image/png"), { mask: area });
  }

  // an image (a data URL) stretched over the whole slide as layer `name`
  function addImageLayer(name, url, extra) {
    return new Promise((resolve, reject) => {
      state.viewer.addSimpleImage({
        url, x: 0, y: 0, width: state.viewer.world.getItemAt(0).getBounds().width,
        success: (e) => { state.layers[name] = { item: e.item, ...extra }; resolve(); },
        error: reject,
      });
    });
  }

  function box(x, y, w, h, className) {
    const item = state.viewer.world.getItemAt(0);
    const el = document.createElement("div");
    el.className = className;
    state.viewer.addOverlay({ element: el, location: item.imageToViewportRectangle(x, y, w, h) });
    return el;
  }

  async function addMedGemma() {
    const id = state.id;
    const resp = await api(`/v1/slides/${encodeURIComponent(id)}/plan`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(withMethod({ strategy: "medgemma", seed: 0 })),
    });
    const plan = await resp.json();
    if (state.id !== id) return;
    drawBag(plan);
  }

  // a bag (a medgemma plan, or a report's "bag" record: the patches its model was sent)
  function drawBag(plan) {
    removeLayer("medgemma");
    const elements = plan.patches.map((p) => box(p.x0, p.y0, plan.width0, plan.height0, "box"));
    state.layers.medgemma = { elements, plan };
    setOpacity("medgemma");
  }

  // viridis at five stops, as the legend's CSS gradient
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function viridis(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    const c = VIRIDIS[i].map((v, k) => Math.round(v + f * (VIRIDIS[i + 1][k] - v)));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }

  async function addPredictions() {
    const id = state.id;
    const resp = await api(`/v1/slides/${encodeURIComponent(id)}/predictions?embedding_format=none`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(withMethod({ strategy: "stratified", n_patches: 300, seed: 0 })),
    });
    const patches = [];
    await eachRecord(resp, (record) => { if (record.type === "patch") patches.push(record); });
    if (state.id !== id || !patches.length) return;
    const key = Object.keys(patches[0].outputs).find((k) => typeof patches[0].outputs[k] === "number");
    const values = patches.map((p) => p.outputs[key]);
    const lo = Math.min(...values), hi = Math.max(...values);
    const elements = patches.map((p, i) => {
      const el = box(p.x0, p.y0, p.width0, p.height0, "pred");
      el.style.background = viridis(hi > lo ? (values[i] - lo) / (hi - lo) : 1);
      el.dataset.index = String(i);
      el.addEventListener("click", () => showPatch(p));
      return el;
    });
    state.layers.predictions = { elements, key, lo, hi, patches };
    addCsvDownload("download-predictions", "Predictions shown (CSV)", "predictions.csv",
      state.predictionsCsv);
    $("legend-bar").classList.remove("jet");
    $("legend-title").textContent = `${key} (${state.info.name})`;
    $("legend-min").textContent = lo.toFixed(3);
    $("legend-max").textContent = hi.toFixed(3);
    $("legend").hidden = false;
  }

  // The predictions on screen as CSV (QuPath / pandas): box in level-0 px, then every output.
  state.predictionsCsv = () => {
    const layer = state.layers.predictions;
    if (!layer) return "";
    const names = Object.keys(layer.patches[0].outputs)
      .filter((k) => typeof layer.patches[0].outputs[k] === "number");
    const lines = [["minx", "miny", "width", "height", ...names].join(",")];
    for (const p of layer.patches) {
      lines.push([p.x0, p.y0, p.width0, p.height0, ...names.map((k) => p.outputs[k])].join(","));
    }
    return lines.join("\n") + "\n";
  };

  // A download of what a layer shows, as CSV, beside the others (added once).
  function addCsvDownload(id, label, suffix, csv) {
    if ($(id)) return;
    const button = document.createElement("button");
    button.type = "button";
    button.id = id;
    button.textContent = label;
    button.addEventListener("click", () => {
      const a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([csv()], { type: "text/csv" }));
      a.download = `${state.info.name}.${suffix}`;
      a.click();
    });
    const li = document.createElement("li");
    li.append(button);
    $("downloads").append(li);
  }

  function showPatch(p) {
    const dl = $("patch");
    dl.replaceChildren();
    const rows = [["x0, y0", `${p.x0}, ${p.y0}`], ...Object.entries(p.outputs)
      .filter(([, v]) => typeof v === "number").map(([k, v]) => [k, v.toFixed(4)])];
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
  }

  // -- a slide-level answer: the configured slide models, their attention on the slide ------
  async function loadSlideModels() {
    try {
      const models = (await (await api("/v1/slide-models")).json()).slide_models;
      state.slideModels = models;
      const select = $("slide-model");
      select.replaceChildren(...models.map((m) => {
        const option = document.createElement("option");
        option.value = m.name;
        option.textContent = `${m.name} (${m.architecture} over ${m.patch_encoder})`;
        return option;
      }));
      $("answer-panel").hidden = !models.length;
      $("attention-layer").hidden = !models.some((m) => m.attention);
      $("answer").disabled = !models.length || !state.viewer;
    } catch (err) {
      state.slideModels = [];  // a key not given yet: listSlides says so
    }
  }

  // jet (CLAM's heatmaps) at matplotlib's breakpoints
  const JET = { r: [[0, 0], [0.35, 0], [0.66, 1], [0.89, 1], [1, 0.5]],
    g: [[0, 0], [0.125, 0], [0.375, 1], [0.64, 1], [0.91, 0], [1, 0]],
    b: [[0, 0.5], [0.11, 1], [0.34, 1], [0.65, 0], [1, 0]] };
  function jet(t) {
    const x = Math.min(1, Math.max(0, t));
    const channel = (points) => {
      for (let i = 1; i < points.length; i++) {
        const [x0, y0] = points[i - 1], [x1, y1] = points[i];
        if (x <= x1) return y0 + (x1 > x0 ? (x - x0) / (x1 - x0) : 0) * (y1 - y0);
      }
      return points[points.length - 1][1];
    };
    const c = [JET.r, JET.g, JET.b].map((p) => Math.round(channel(p) * 255));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }

  // CLAM's percentiles: average ranks over N, in (0, 1]
  function percentiles(scores) {
    const order = scores.map((v, i) => [v, i]).sort((a, b) => a[0] - b[0]);
    const out = new Array(scores.length);
    for (let i = 0; i < order.length;) {
      let j = i;
      while (j + 1 < order.length && order[j + 1][0] === order[i][0]) j++;
      const rank = (i + j + 2) / 2;
      for (let k = i; k <= j; k++) out[order[k][1]] = rank / scores.length;
      i = j + 1;
    }
    return out;
  }

  // An NDJSON stream, record by record as it arrives; an error record ends it with its error.
  async function eachRecord(resp, onRecord) {
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      const lines = pending.split("\n");
      pending = lines.pop();
      for (const line of lines.filter(Boolean)) {
        const record = JSON.parse(line);
        if (record.type === "error") throw new Error(record.error);
        onRecord(record);
      }
    }
  }

  async function streamAnswer(id, model) {
    const resp = await api(`/v1/slides/${encodeURIComponent(id)}/slide-predictions`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(withMethod({ slide_models: [model], include_attention: true })),
    });
    let result = null;
    await eachRecord(resp, (record) => {
      if (record.type === "progress") {
        $("answer-progress").textContent =
          `encoding patches: ${record.patches_done} / ${record.patches_total}`;
      }
      if (record.type === "result") result = record;
    });
    if (!result) throw new Error("the stream ended without an answer");
    return result;
  }

  function renderAnswer(result) {
    const dl = $("answer-result");
    dl.replaceChildren();
    const rows = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
    for (const [name, p] of rows) {
      const dt = document.createElement("dt"); dt.textContent = name;
      const dd = document.createElement("dd"); dd.textContent = p.toFixed(3);
      if (name === result.predicted_class) dd.className = "top";
      dl.append(dt, dd);
    }
    if (!rows.length && result.embedding_dim) {
      const dt = document.createElement("dt"); dt.textContent = "embedding";
      const dd = document.createElement("dd"); dd.textContent = `${result.embedding_dim}-d`;
      dl.append(dt, dd);
    }
    $("answer-progress").textContent = `${result.slide_model}: ${result.n_patches} patches`;
  }

  async function addAttention() {
    const id = state.id, model = $("slide-model").value;
    $("answer").disabled = true;
    try {
      const result = await streamAnswer(id, model);
      if (state.id !== id) return;
      state.answer = result;
      renderAnswer(result);
      const att = result.patch_attention;
      if (!att) return;  // a model without patch scores: the answer alone
      const column = att.columns.indexOf(result.attention.display_column);
      const raw = att.scores.map((row) => row[Math.max(0, column)]);
      const pct = percentiles(raw);
      const elements = raw.map((v, i) => {
        const el = box(att.x0[i], att.y0[i], att.width0, att.height0, "attn");
        el.style.background = jet(pct[i]);
        el.addEventListener("click", () => showPatch({ x0: att.x0[i], y0: att.y0[i],
          outputs: { attention: v, attention_percentile: pct[i] } }));
        return el;
      });
      state.layers.attention = { elements, raw, pct, att };
      addCsvDownload("download-attention", "Attention shown (CSV)", "attention.csv",
        state.attentionCsv);
      $("legend-bar").classList.add("jet");
      $("legend-title").textContent = `${result.attention.display_column} percentile (${model})`;
      $("legend-min").textContent = "0";
      $("legend-max").textContent = "1";
      $("legend").hidden = false;
    } finally {
      $("answer").disabled = false;
    }
  }

  // The attention on screen as CSV: box in level-0 px, raw score, CLAM percentile.
  state.attentionCsv = () => {
    const layer = state.layers.attention;
    if (!layer) return "";
    const { att, raw, pct } = layer;
    const lines = ["minx,miny,width,height,attention,attention_percentile"];
    raw.forEach((v, i) => lines.push([att.x0[i], att.y0[i], att.width0, att.height0, v, pct[i]].join(",")));
    return lines.join("\n") + "\n";
  };

  // -- a MedGemma report: the bag on the slide, the model's text streamed beside it ---------
  async function describe() {
    const id = state.id, out = $("report");
    out.textContent = "";
    $("describe").disabled = true;
    try {
      const resp = await api(`/v1/slides/${encodeURIComponent(id)}/reports`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(withMethod({ prompt: $("prompt").value })),
      });
      await eachRecord(resp, (record) => {
        if (record.type === "bag" && state.id === id) {  // the boxes are what the model saw
          $("layer-medgemma").checked = true;
          drawBag(record);
        }
        if (record.type === "delta") out.textContent += record.text;
        if (record.type === "report") { out.textContent = record.text; state.report = record; }
      });
    } catch (err) {
      out.textContent = "";
      showError(`The report could not be made: ${err.message}`);
    } finally {
      $("describe").disabled = false;
    }
  }
  $("describe").addEventListener("click", describe);

  for (const name of LAYERS) {
    $(`layer-${name}`).addEventListener("change", (e) => toggleLayer(name, e.target.checked));
    $(`opacity-${name}`).addEventListener("input", () => setOpacity(name));
  }
  $("answer").addEventListener("click", () => {
    removeLayer("attention");
    $("layer-attention").checked = true;
    toggleLayer("attention", true);
  });
  listSlides();
  loadSlideModels();
})();
