// hw-sim technician page: reads the control API, follows /events (SSE) and redraws
// the device whose observation arrived. No framework, no build step.
"use strict";

const KEYS = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "*", "0", "#"];
const FAULT_KINDS = ["offline", "delay", "drop", "corrupt"];
const LOCK_API_FAULT_KINDS = FAULT_KINDS.concat(["http429", "http503", "slow"]);
let devices = [];
let units = [];

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else if (k === "on") for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (!res.ok) throw new Error(method + " " + path + ": " + res.status);
  return res.status === 204 ? null : res.json();
}

function report(err) {
  const s = document.getElementById("live-text");
  if (s) s.textContent = document.body.dataset.live + " — " + err.message;
}

// ---- keypads ----
function keypadCard(id) {
  const pad = el("div", { class: "keypad", role: "group", "aria-label": id + " keys" });
  for (const k of KEYS) {
    pad.append(el("button", {
      type: "button", "aria-label": id + " key " + k, text: k,
      on: { click: () => api("POST", "/keypads/" + encodeURIComponent(id) + "/keys", { keys: k }).catch(report) },
    }));
  }
  return el("article", { class: "card", "data-keypad": id },
    el("h3", { text: id }),
    el("p", { class: "screen", "data-role": "keypad-text", "aria-live": "polite", "aria-label": id + " text" }),
    el("p", { class: "status" },
      el("span", { class: "led", "data-role": "keypad-led", "data-led": "off", text: "LED off" }),
      " ",
      el("span", { class: "buzzer", "data-role": "keypad-buzzer", "data-buzzer": "false", text: "buzzer silent" })),
    pad);
}

async function refreshKeypad(id) {
  const card = document.querySelector('[data-keypad="' + CSS.escape(id) + '"]');
  if (!card) return;
  const s = await api("GET", "/keypads/" + encodeURIComponent(id));
  const text = card.querySelector('[data-role="keypad-text"]');
  if (text.textContent !== (s.text || "")) text.textContent = s.text || "";
  const led = card.querySelector('[data-role="keypad-led"]');
  const colour = s.led || "off";
  led.dataset.led = colour;
  led.textContent = "LED " + colour + (s.led_flashing ? " (flashing)" : "");
  const buz = card.querySelector('[data-role="keypad-buzzer"]');
  buz.dataset.buzzer = String(!!s.buzzer);
  buz.textContent = s.buzzer ? "buzzer sounding" : "buzzer silent";
  card.dataset.online = String(s.online !== false);
}

// ---- relay boards ----
function boardCard(id) {
  return el("article", { class: "card", "data-board": id },
    el("h3", { text: id }),
    el("h4", { text: "Coils" }), el("ul", { class: "io coils" }),
    el("h4", { text: "Inputs" }), el("ul", { class: "io inputs" }));
}

async function refreshBoard(id) {
  const card = document.querySelector('[data-board="' + CSS.escape(id) + '"]');
  if (!card) return;
  const s = await api("GET", "/relays/" + encodeURIComponent(id));
  const coils = card.querySelector(".coils");
  s.coils.forEach((on, n) => {
    let li = coils.querySelector('[data-coil="' + n + '"]');
    if (!li) { li = el("li", { "data-coil": String(n) }); coils.append(li); }
    li.dataset.on = String(on);
    li.textContent = "coil " + n + ": " + (on ? "on" : "off");
  });
  const inputs = card.querySelector(".inputs");
  s.inputs.forEach((on, n) => {
    let li = inputs.querySelector('[data-input="' + n + '"]');
    if (!li) {
      li = el("li", { "data-input": String(n) },
        el("span", { class: "label" }),
        el("button", {
          type: "button", "aria-label": id + " input " + n,
          on: { click: () => toggleInput(id, n, li.dataset.on !== "true") },
        }));
      inputs.append(li);
    }
    li.dataset.on = String(on);
    li.querySelector(".label").textContent = "input " + n + ": " + (on ? "on" : "off");
    const b = li.querySelector("button");
    b.setAttribute("aria-pressed", String(on));
    b.textContent = on ? "Turn off" : "Turn on";
  });
}

function toggleInput(board, n, on) {
  return api("POST", "/relays/" + encodeURIComponent(board) + "/inputs/" + n, { on })
    .then(() => refreshBoard(board)).catch(report);
}

// ---- units ----
function unitTile(u) {
  const tile = el("article", { class: "unit", "data-unit": u.name },
    el("h3", { text: u.name }),
    el("p", { class: "state" }),
    el("p", { class: "door" }));
  const btn = el("button", {
    type: "button", "aria-label": u.name + " door",
    on: { click: () => {
      const cur = units.find((x) => x.name === u.name);
      if (cur && cur.door) toggleInput(cur.door.board, cur.door.input, !cur.door_open).then(refreshUnits);
    } },
  });
  if (!u.door) btn.disabled = true;
  tile.append(btn);
  return tile;
}

function drawUnit(u) {
  let tile = document.querySelector('[data-unit="' + CSS.escape(u.name) + '"]');
  if (!tile) { tile = unitTile(u); document.getElementById("units").append(tile); }
  const overlocked = u.lock_state === "overlocked" || u.overlock_on === true;
  const state = overlocked ? "overlocked" : (u.lock_state || "clear");
  tile.dataset.lock = u.lock_state || "";
  tile.dataset.overlock = String(u.overlock_on === true);
  tile.dataset.door = u.door ? (u.door_open ? "open" : "closed") : "none";
  tile.dataset.state = state;
  tile.querySelector(".state").textContent = (overlocked ? "✖ " : "") + state;
  tile.querySelector(".door").textContent = "door " + tile.dataset.door;
  const btn = tile.querySelector("button");
  btn.textContent = u.door ? (u.door_open ? "Close door" : "Open door") : "No door sensor";
  btn.setAttribute("aria-pressed", String(!!u.door_open));
}

async function refreshUnits() {
  try {
    units = await api("GET", "/units");
  } catch (e) {
    units = [];
  }
  const box = document.getElementById("units");
  if (!units.length) box.textContent = "No units configured ([[units]] in the site file).";
  else if (box.firstChild && box.firstChild.nodeType === Node.TEXT_NODE) box.textContent = "";
  units.forEach(drawUnit);
}

// ---- faults ----
function faultCard(d) {
  const card = el("article", { class: "card", "data-fault-card": d.id }, el("h3", { text: d.id + " (" + d.kind + ")" }));
  const dur = el("input", { type: "number", min: "1", value: "60", id: "dur-" + d.id });
  card.append(el("label", { for: "dur-" + d.id, text: "Duration (s) " }), dur);
  const list = el("div", { class: "switches" });
  for (const kind of (d.kind === "lock_api" ? LOCK_API_FAULT_KINDS : FAULT_KINDS)) {
    list.append(el("button", {
      type: "button", "data-fault-device": d.id, "data-fault-kind": kind, "aria-pressed": "false",
      text: kind,
      on: { click: (ev) => toggleFault(d.id, kind, ev.currentTarget.getAttribute("aria-pressed") !== "true", dur) },
    }));
  }
  card.append(list);
  return card;
}

async function toggleFault(device, kind, on, dur) {
  try {
    if (on) {
      const s = Math.max(1, Number(dur.value) || 60);
      const body = { device, kind, duration_ms: Math.round(s * 1000) };
      if (kind === "delay" || kind === "slow") body.value = 500;
      if (kind === "http429") body.value = 5;
      if (kind === "drop" || kind === "corrupt") body.value = 1;
      await api("POST", "/faults", body);
    } else {
      await api("DELETE", "/faults?device=" + encodeURIComponent(device));
    }
  } catch (e) { report(e); }
  await refreshFaults();
}

async function refreshFaults() {
  const list = await api("GET", "/faults");
  const active = {};
  for (const f of list) active[f.device] = (f.faults || []).map((x) => x.kind || x);
  document.querySelectorAll("[data-fault-device]").forEach((b) => {
    const on = (active[b.dataset.faultDevice] || []).includes(b.dataset.faultKind);
    b.setAttribute("aria-pressed", String(on));
    b.textContent = b.dataset.faultKind + (on ? ": on" : ": off");
  });
}

// ---- whole page ----
async function loadAll() {
  devices = await api("GET", "/devices");
  const kp = document.getElementById("keypads"), rb = document.getElementById("relays"), fl = document.getElementById("faults");
  for (const d of devices) {
    if (d.kind === "keypad" && !document.querySelector('[data-keypad="' + CSS.escape(d.id) + '"]')) kp.append(keypadCard(d.id));
    if (d.kind === "relay_board" && !document.querySelector('[data-board="' + CSS.escape(d.id) + '"]')) rb.append(boardCard(d.id));
    if (!document.querySelector('[data-fault-card="' + CSS.escape(d.id) + '"]')) fl.append(faultCard(d));
  }
  await Promise.all(devices.map((d) => refreshDevice(d.id)));
  await Promise.all([refreshUnits(), refreshFaults()]);
}

function refreshDevice(id) {
  const d = devices.find((x) => x.id === id);
  if (!d) return Promise.resolve();
  if (d.kind === "keypad") return refreshKeypad(id).catch(report);
  if (d.kind === "relay_board") return refreshBoard(id).then(refreshUnits).catch(report);
  if (d.kind === "lock_api") return refreshUnits();
  return Promise.resolve();
}

function setLive(on) {
  document.body.dataset.live = on ? "connected" : "disconnected";
  document.getElementById("live-text").textContent = on ? "live" : "disconnected — reconnecting";
}

function connect() {
  const es = new EventSource("/events");
  // Connected once the stream is open; everything is re-read since changes may have been missed.
  es.onopen = () => { setLive(true); loadAll().catch(report); };
  es.onerror = () => setLive(false);
  es.onmessage = (m) => {
    let o;
    try { o = JSON.parse(m.data); } catch (e) { return; }
    if (o.kind === "subscribed") { if (document.body.dataset.live !== "connected") setLive(true); return; }
    if (o.kind === "lagged" || o.device === "*") { loadAll().catch(report); return; }
    if (o.kind === "fault_set" || o.kind === "fault_cleared") refreshFaults().catch(report);
    refreshDevice(o.device);
  };
}

document.addEventListener("DOMContentLoaded", () => { loadAll().catch(report); connect(); });
