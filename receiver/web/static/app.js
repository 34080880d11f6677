// The web page of receiver: the list of streams (live, then recordings) and a stream's page.
// Everything comes from the JSON API under the same login; no inline script (the CSP forbids it).
"use strict";

const TRACK_COLORS = { inbound: "#2563eb", outbound: "#d97706" };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("login required");
  }
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function seconds(value) {
  const s = Number(value) || 0;
  const m = Math.floor(s / 60);
  return m ? `${m}:${(s - m * 60).toFixed(1).padStart(4, "0")}` : `${s.toFixed(1)} s`;
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toISOString().replace("T", " ").slice(0, 19);
}

function params(object) {
  const entries = Object.entries(object || {});
  if (!entries.length) return "";
  return entries.map(([k, v]) => `${k}=${v}`).join(", ");
}

// A level (0..1 of full scale) as a share of the meter: -60 dBFS .. 0 dBFS.
function meterShare(level) {
  if (!(level > 0)) return 0;
  const db = 20 * Math.log10(level);
  return Math.max(0, Math.min(1, (db + 60) / 60));
}

// ---- the list ----------------------------------------------------------------------------

const listState = { page: 1, pages: 1, liveIds: "" };
window.liveUpdates = 0;

function liveRow(stream) {
  const meters = el("td", { class: "meters" });
  for (const track of ["inbound", "outbound"]) {
    const bar = el("div", { class: `bar ${track}` });
    const peak = el("div", { class: "peak" });
    const meter = el("div", { class: "meter", "data-track": track, title: track }, bar, peak);
    meters.append(el("div", { class: "meter-row" }, el("span", { class: "track", text: track[0] }), meter));
  }
  return el(
    "tr",
    { "data-id": String(stream.id), "data-sid": stream.stream_sid },
    el("td", { class: "sid" }, el("span", { class: "dot" }), stream.stream_sid),
    el("td", { text: stream.path }),
    el("td", { class: "params", text: params(stream.custom_parameters) }),
    el("td", { text: stream.codec || "" }),
    el("td", { class: "duration", text: seconds(stream.duration_s) }),
    meters,
  );
}

function showLive(streams) {
  window.liveUpdates += 1;
  const body = document.querySelector("#live tbody");
  const ids = streams.map((s) => s.id).join(",");
  if (ids !== listState.liveIds) {
    const ended = listState.liveIds && listState.liveIds.split(",").some((id) => !ids.split(",").includes(id));
    listState.liveIds = ids;
    body.replaceChildren(...streams.map(liveRow));
    if (ended) {
      // A stream that ended is now a recording; its stream.json is final a moment later.
      loadFinished();
      setTimeout(loadFinished, 2500);
    }
  }
  for (const stream of streams) {
    const row = body.querySelector(`tr[data-id="${stream.id}"]`);
    if (!row) continue;
    row.querySelector(".duration").textContent = seconds(stream.duration_s);
    for (const meter of row.querySelectorAll(".meter")) {
      const level = stream.tracks[meter.dataset.track];
      meter.dataset.rms = level ? String(level.rms) : "";
      meter.classList.toggle("absent", !level);
      meter.querySelector(".bar").style.width = `${(meterShare(level && level.rms) * 100).toFixed(1)}%`;
      meter.querySelector(".peak").style.left = `${(meterShare(level && level.peak) * 100).toFixed(1)}%`;
    }
  }
  document.dispatchEvent(new CustomEvent("live-update", { detail: streams }));
  document.querySelector("#live-count").textContent = streams.length ? `(${streams.length})` : "";
  document.querySelector("#live-empty").hidden = streams.length > 0;
}

function watchLive() {
  const source = new EventSource("/api/live/events");
  source.onmessage = (event) => showLive(JSON.parse(event.data).live);
  source.onerror = async () => {
    // Closed by the server (logged out, expired, shutting down): check whether the login holds.
    if (source.readyState === EventSource.CLOSED) {
      try {
        await getJSON("/api/live");
        setTimeout(watchLive, 2000);
      } catch (error) {
        /* redirected to the login page */
      }
    }
  };
}

async function loadFinished() {
  const query = new URLSearchParams({ page: String(listState.page) });
  const q = document.querySelector("#q").value.trim();
  const date = document.querySelector("#date").value;
  if (q) query.set("q", q);
  if (date) query.set("date", date);
  const data = await getJSON(`/api/streams?${query}`);
  listState.pages = data.pages;
  const body = document.querySelector("#finished tbody");
  body.replaceChildren(
    ...data.finished.map((s) => {
      const link = el("a", { href: `/streams/${encodeURIComponent(s.directory)}`, text: s.stream_sid || s.directory });
      return el(
        "tr",
        { "data-directory": s.directory },
        el("td", { class: "time", text: when(s.started_at) }),
        el("td", { class: "sid" }, link),
        el("td", { text: s.path }),
        el("td", { class: "params", text: params(s.custom_parameters) }),
        el("td", { text: seconds(s.duration_s) }),
        el("td", { text: s.tracks.join(", ") }),
        el(
          "td",
          {},
          el("span", { class: `end ${s.status === "complete" ? s.end : s.status}`, text: s.status === "complete" ? s.end : s.status }),
          s.uploaded ? el("span", { class: "end uploaded", text: "uploaded" }) : "",
        ),
      );
    }),
  );
  document.querySelector("#total").textContent = `(${data.total})`;
  document.querySelector("#finished-empty").hidden = data.finished.length > 0;
  document.querySelector("#page").textContent = `page ${data.page} of ${data.pages}`;
  document.querySelector("#prev").disabled = data.page <= 1;
  document.querySelector("#next").disabled = data.page >= data.pages;
  if (!data.live.length) showLive([]);
}

function listPage() {
  document.querySelector("#search").addEventListener("submit", (event) => {
    event.preventDefault();
    listState.page = 1;
    loadFinished();
  });
  document.querySelector("#prev").addEventListener("click", () => { listState.page -= 1; loadFinished(); });
  document.querySelector("#next").addEventListener("click", () => { listState.page += 1; loadFinished(); });
  loadFinished();
  watchLive();
}

// ---- a stream's page -----------------------------------------------------------------------

function tickStep(duration) {
  for (const step of [0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600]) {
    if (duration / step <= 10) return step;
  }
  return 7200;
}

function drawAxis(axis, duration) {
  axis.replaceChildren();
  if (!(duration > 0)) return;
  const step = tickStep(duration);
  for (let t = 0; t <= duration + 1e-9; t += step) {
    const tick = el("span", { class: "tick", text: seconds(t) });
    tick.style.left = `${(t / duration) * 100}%`;
    axis.append(tick);
  }
}

function drawWaveform(canvas, envelope, waveform, events, color) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth * ratio;
  const height = canvas.clientHeight * ratio;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const duration = waveform.duration_s || 1;
  const x = (t) => (t / duration) * width;
  // Digital silence first, under the wave.
  ctx.fillStyle = "rgba(220, 38, 38, 0.16)";
  const silence = envelope.silence_s;
  for (let i = 0; i + 1 < silence.length; i += 2) {
    ctx.fillRect(x(silence[i]), 0, Math.max(1, x(silence[i + 1]) - x(silence[i])), height);
  }
  ctx.strokeStyle = "#cbd5e1";
  ctx.beginPath();
  ctx.moveTo(0, height / 2);
  ctx.lineTo(width, height / 2);
  ctx.stroke();
  ctx.fillStyle = color;
  const step = width / waveform.points;
  for (let i = 0; i < envelope.min.length; i += 1) {
    // Whole pixels, so that the wave is drawn in its own colour, not blended at the edges.
    const left = Math.floor(i * step);
    const top = Math.floor((1 - envelope.max[i]) * height / 2);
    const bottom = Math.ceil((1 - envelope.min[i]) * height / 2);
    ctx.fillRect(left, top, Math.max(1, Math.floor((i + 1) * step) - left), Math.max(bottom - top, 1));
  }
  ctx.font = `${11 * ratio}px system-ui, sans-serif`;
  for (const event of events) {
    ctx.fillStyle = ctx.strokeStyle = event.kind === "dtmf" ? "#7c3aed" : "#059669";
    const at = Math.round(x(event.at_ms / 1000));
    ctx.fillRect(at, 0, Math.max(1, Math.round(ratio * 2)), height);
    ctx.fillText(event.label, at + 3 * ratio, 12 * ratio);
  }
}

function fact(list, term, value) {
  if (value === undefined || value === null || value === "") return;
  list.append(el("dt", { text: term }), el("dd", { text: String(value) }));
}

async function streamPage() {
  const directory = decodeURIComponent(window.location.pathname.split("/").pop());
  const data = await getJSON(`/api/streams/${encodeURIComponent(directory)}`);
  const record = data.record;
  document.title = `receiver · ${record.stream_sid}`;
  document.querySelector("#title").textContent = record.stream_sid || directory;
  const facts = document.querySelector("#facts");
  const end = record.end || {};
  fact(facts, "status", record.status);
  fact(facts, "ended by", end.kind ? `${end.kind}${end.close_code ? ` (${end.close_code}${end.reason ? `: ${end.reason}` : ""})` : ""}` : "");
  fact(facts, "started", when(record.started_at));
  fact(facts, "ended", when(record.ended_at));
  fact(facts, "call sid", record.call_sid);
  fact(facts, "account sid", record.account_sid);
  fact(facts, "path", record.path + (record.query ? `?${record.query}` : ""));
  fact(facts, "from", record.remote);
  const format = record.media_format || {};
  fact(facts, "format", `${format.encoding} ${format.sample_rate_hz} Hz (${record.codec || "not decoded"})`);
  fact(facts, "messages", record.messages);
  fact(facts, "unsupported", record.unsupported_reason);
  fact(facts, "sink errors", (record.sink_errors || []).join("; "));
  const paramList = document.querySelector("#params");
  for (const [k, v] of Object.entries(record.custom_parameters || {})) fact(paramList, k, v);

  const events = [
    ...(record.dtmf || []).map((d) => ({ kind: "dtmf", at_ms: d.at_ms, label: d.digit, track: d.track, value: d.digit })),
    ...(record.marks || []).map((m) => ({ kind: "mark", at_ms: m.at_ms, label: m.name, track: null, value: m.name })),
  ].sort((a, b) => a.at_ms - b.at_ms);
  document.querySelector("#events tbody").replaceChildren(
    ...events.map((e) => el("tr", {}, el("td", { text: seconds(e.at_ms / 1000) }), el("td", { text: e.kind }), el("td", { text: e.value }), el("td", { text: e.track || "" }))),
  );
  document.querySelector("#events-empty").hidden = events.length > 0;

  document.querySelector("#files").replaceChildren(
    ...data.files.map((f) => el("li", {}, el("a", { href: f.url, download: f.name, text: f.name }), ` ${(f.bytes / 1024).toFixed(1)} KiB`)),
  );
  document.querySelector("#record").textContent = JSON.stringify(record, null, 2);
  const upload = record.upload;
  if (upload && upload.objects) {
    // Where delivery stored the files (s3://, gs://, az://, file:// or https:// URLs).
    fact(facts, "uploaded", `${when(upload.uploaded_at)} to ${upload.url}`);
    document.querySelector("#stored").replaceChildren(
      ...Object.entries(upload.objects).map(([name, url]) => {
        const target = /^https?:\/\//.test(url) ? el("a", { href: url, text: url }) : el("code", { text: url });
        return el("li", { "data-name": name }, `${name}: `, target);
      }),
    );
    document.querySelector("#stored-section").hidden = false;
  }

  const waveform = await getJSON(`/api/streams/${encodeURIComponent(directory)}/waveform`);
  drawAxis(document.querySelector("#axis"), waveform.duration_s);
  const container = document.querySelector("#tracks");
  const stats = record.tracks || {};
  const audioFiles = Object.fromEntries(data.files.map((f) => [f.track, f]));
  const drawers = [];
  for (const track of [...Object.keys(waveform.tracks), "stereo"]) {
    const file = audioFiles[track];
    if (!file) continue;
    const audio = el("audio", { controls: "", preload: "metadata", src: file.url, "data-track": track });
    const info = stats[track];
    const label = el(
      "div",
      { class: "label" },
      el("strong", { text: track }),
      el("span", { text: info ? `${seconds(info.duration_s)} · ${info.gaps} gap(s) · ${seconds(info.silence_s)} silence` : "inbound left, outbound right" }),
    );
    const row = el("div", { class: "track-row", "data-track": track }, label);
    if (waveform.tracks[track]) {
      const canvas = el("canvas", { class: "wave", "data-track": track });
      const cursor = el("div", { class: "cursor" });
      const wrap = el("div", { class: "wave-wrap" }, canvas, cursor);
      row.append(wrap);
      const draw = () => drawWaveform(canvas, waveform.tracks[track], waveform, events, TRACK_COLORS[track] || "#475569");
      drawers.push(draw);
      canvas.addEventListener("click", (event) => {
        const share = event.offsetX / canvas.clientWidth;
        audio.currentTime = share * waveform.duration_s;
        audio.play();
      });
      audio.addEventListener("timeupdate", () => {
        cursor.style.left = `${(audio.currentTime / (waveform.duration_s || 1)) * 100}%`;
      });
    }
    row.append(audio);
    container.append(row);
  }
  for (const draw of drawers) draw();
  window.addEventListener("resize", () => drawers.forEach((draw) => draw()));
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "list") listPage();
  else if (page === "stream") streamPage().catch((error) => { document.querySelector("#title").textContent = String(error); });
});
