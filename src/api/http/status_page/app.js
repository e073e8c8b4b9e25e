// The gateway's status page: asks for an access token, keeps it in sessionStorage (never in
// a URL), and every 2 s reads GET /v1/status?detail=full and GET /v1/devices with it.
// Everything from the API goes into the page as text (textContent), never as HTML.
(function () {
  "use strict";

  var KEY = "unitgate.status.token";
  var PERIOD_MS = 2000;
  var TIMEOUT_MS = 5000;
  var STATUSES = ["available", "reserved", "occupied", "overlocked", "unavailable", "repossessed"];

  var memoryToken = null; // when sessionStorage is unavailable
  var timer = null;
  var inflight = false;
  var lastOk = null;
  var shown = {}; // section -> JSON last rendered, so unchanged tables are not rebuilt

  function $(sel) { return document.querySelector(sel); }

  function loadToken() {
    try { return window.sessionStorage.getItem(KEY); } catch (e) { return memoryToken; }
  }
  function saveToken(t) {
    memoryToken = t;
    try { window.sessionStorage.setItem(KEY, t); } catch (e) { /* memory only */ }
  }
  function forgetToken() {
    memoryToken = null;
    try { window.sessionStorage.removeItem(KEY); } catch (e) { /* nothing stored */ }
  }

  function Failure(message, auth) {
    this.message = message;
    this.auth = !!auth;
  }

  function duration(secs) {
    var s = Math.max(0, Math.floor(secs));
    function two(n) { return (n < 10 ? "0" : "") + n; }
    if (s < 60) { return s + "s"; }
    if (s < 3600) { return Math.floor(s / 60) + "m " + two(s % 60) + "s"; }
    if (s < 86400) { return Math.floor(s / 3600) + "h " + two(Math.floor(s % 3600 / 60)) + "m"; }
    return Math.floor(s / 86400) + "d " + two(Math.floor(s % 86400 / 3600)) + "h";
  }

  function when(iso) {
    if (!iso) { return "-"; }
    var d = new Date(iso);
    if (isNaN(d.getTime())) { return String(iso); }
    return d.toLocaleString([], { dateStyle: "short", timeStyle: "medium" });
  }

  function text(v) {
    if (v === null || v === undefined || v === "") { return "-"; }
    return String(v);
  }

  function cell(tag, content, cls) {
    var c = document.createElement(tag);
    c.textContent = content;
    if (cls) { c.className = cls; }
    if (tag === "th") { c.scope = "row"; }
    return c;
  }

  function timeCell(iso) {
    var td = document.createElement("td");
    var t = document.createElement("time");
    if (iso) { t.dateTime = iso; t.title = iso; }
    t.textContent = when(iso);
    td.appendChild(t);
    return td;
  }

  function emptyRow(tbody, cols, message) {
    var tr = document.createElement("tr");
    var td = cell("td", message, "empty");
    td.colSpan = cols;
    tr.appendChild(td);
    tbody.appendChild(tr);
  }

  // Rebuilds a section only when its data changed.
  function changed(section, data) {
    var key = JSON.stringify(data);
    if (shown[section] === key) { return false; }
    shown[section] = key;
    return true;
  }

  async function get(path, token) {
    var ctl = new AbortController();
    var t = setTimeout(function () { ctl.abort(); }, TIMEOUT_MS);
    var res;
    var body = null;
    try {
      res = await fetch(path, {
        headers: { "Authorization": "Bearer " + token, "Accept": "application/json" },
        cache: "no-store",
        credentials: "omit",
        signal: ctl.signal
      });
      try { body = await res.json(); } catch (e) { body = null; }
    } catch (e) {
      throw new Failure(ctl.signal.aborted
        ? "the gateway did not answer within " + TIMEOUT_MS / 1000 + " s"
        : "the gateway cannot be reached");
    } finally {
      clearTimeout(t);
    }
    var why = body && body.error && body.error.message ? ": " + body.error.message : "";
    if (res.status === 401) {
      throw new Failure("The gateway refused this access token (401" + why + "). Check it and try again.", true);
    }
    if (res.status === 403) {
      throw new Failure("This access token may not read the status (403" + why + "); it needs the read scope.", true);
    }
    if (!res.ok) { throw new Failure("the gateway answered " + res.status + why); }
    if (body === null) { throw new Failure("the gateway's answer to " + path + " is not JSON"); }
    return body;
  }

  function showLogin(message) {
    clearTimeout(timer);
    var main = $("#main");
    main.dataset.loaded = "false";
    delete main.dataset.stale;
    $("#dashboard").hidden = true;
    $("#controls").hidden = true;
    $('[data-role="site"]').textContent = "";
    shown = {};
    lastOk = null;
    var err = $('[data-role="login-error"]');
    err.textContent = message || "";
    var form = $("#login");
    form.hidden = false;
    var input = $("#token");
    input.setAttribute("aria-invalid", message ? "true" : "false");
    input.focus();
  }

  function showDashboard() {
    $("#login").hidden = true;
    $('[data-role="login-error"]').textContent = "";
    $("#dashboard").hidden = false;
    $("#controls").hidden = false;
  }

  function setStale(problem) {
    var main = $("#main");
    var el = $('[data-role="stale"]');
    if (!problem) {
      delete main.dataset.stale;
      el.hidden = true;
      el.textContent = "";
      return;
    }
    main.dataset.stale = "true";
    // Kept the same while the same problem lasts, so the alert is not announced every 2 s.
    var since = lastOk
      ? " The figures below are from " + new Date(lastOk).toLocaleTimeString() + "."
      : " Nothing has been read yet.";
    var words = "Connection problem: " + problem + "." + since + " Retrying every 2 s.";
    if (el.textContent !== words) { el.textContent = words; }
    el.hidden = false;
  }

  function linkState(links) {
    var names = Object.keys(links || {});
    if (names.length === 0) { return "not_configured"; }
    var up = names.filter(function (n) { return links[n] && links[n].connected === true; }).length;
    if (up === names.length) { return "connected"; }
    return up === 0 ? "disconnected" : "degraded";
  }

  var LINK_WORDS = {
    connected: "connected",
    disconnected: "disconnected",
    degraded: "partly connected",
    not_configured: "no cloud link configured"
  };

  function renderLinks(st) {
    var links = st.link || {};
    var state = linkState(links);
    var el = $('[data-role="link"]');
    el.dataset.state = state;
    el.textContent = LINK_WORDS[state];
    el.className = state === "connected" ? "ok" : (state === "not_configured" ? "" : "bad");
    if (!changed("links", links)) { return; }
    var tbody = $("#links");
    tbody.replaceChildren();
    var names = Object.keys(links).sort();
    if (names.length === 0) { emptyRow(tbody, 5, "No cloud link is configured."); }
    names.forEach(function (name) {
      var l = links[name] || {};
      var tr = document.createElement("tr");
      var up = l.connected === true;
      tr.dataset.link = name;
      tr.dataset.state = up ? "connected" : "disconnected";
      tr.appendChild(cell("th", name));
      tr.appendChild(cell("td", up ? "connected" : "disconnected", up ? "state ok" : "state bad"));
      tr.appendChild(timeCell(l.since));
      tr.appendChild(cell("td", text(l.delivered_seq), "num"));
      tr.appendChild(cell("td", text(l.last_error), "text"));
      tbody.appendChild(tr);
    });
  }

  function renderBacklog(st) {
    var b = st.backlog || {};
    $('[data-role="backlog-events"]').textContent = text(b.events);
    var oldest = $('[data-role="backlog-oldest"]');
    if (typeof b.oldest_age_s === "number") {
      oldest.dataset.seconds = String(b.oldest_age_s);
      oldest.textContent = duration(b.oldest_age_s) + " old";
    } else {
      oldest.dataset.seconds = "";
      oldest.textContent = "none";
    }
    $('[data-role="last-seq"]').textContent = text(st.last_seq);
  }

  function renderDevices(devices) {
    if (!changed("devices", devices)) { return; }
    var tbody = $("#devices");
    tbody.replaceChildren();
    if (devices.length === 0) { emptyRow(tbody, 6, "No device is configured."); }
    devices.forEach(function (d) {
      var tr = document.createElement("tr");
      var on = d.online === true;
      tr.dataset.device = String(d.id);
      tr.dataset.online = on ? "true" : "false";
      tr.appendChild(cell("th", text(d.id)));
      tr.appendChild(cell("td", text(d.kind)));
      tr.appendChild(cell("td", text(d.zone)));
      tr.appendChild(cell("td", on ? "online" : "offline", on ? "state ok" : "state bad"));
      tr.appendChild(cell("td", text(d.queue_depth), "num"));
      tr.appendChild(cell("td", text(d.last_error), "text"));
      tbody.appendChild(tr);
    });
  }

  function renderUnits(counts) {
    if (!changed("units", counts)) { return; }
    var tbody = $("#units");
    tbody.replaceChildren();
    var names = STATUSES.concat(Object.keys(counts).filter(function (s) {
      return STATUSES.indexOf(s) < 0;
    }).sort());
    var total = 0;
    names.forEach(function (s) {
      var n = Number(counts[s] || 0);
      total += n;
      var tr = document.createElement("tr");
      tr.appendChild(cell("th", s));
      var td = cell("td", String(n), "num");
      td.dataset.statusCount = s;
      tr.appendChild(td);
      tbody.appendChild(tr);
    });
    var tr = document.createElement("tr");
    tr.className = "total";
    tr.appendChild(cell("th", "total"));
    var td = cell("td", String(total), "num");
    td.dataset.role = "units-total";
    tr.appendChild(td);
    tbody.appendChild(tr);
  }

  function renderAccess(list) {
    if (!changed("access", list)) { return; }
    var tbody = $("#access");
    tbody.replaceChildren();
    if (list.length === 0) { emptyRow(tbody, 6, "No access decision yet."); }
    list.forEach(function (a) {
      var tr = document.createElement("tr");
      tr.dataset.access = String(a.seq);
      tr.dataset.granted = a.granted ? "true" : "false";
      if (a.reason) { tr.dataset.reason = a.reason; }
      tr.appendChild(timeCell(a.occurred_at));
      tr.appendChild(cell("td", text(a.keypad)));
      tr.appendChild(cell("td", text(a.zone)));
      tr.appendChild(cell("td", a.granted ? "granted" : "denied", a.granted ? "state ok" : "state bad"));
      tr.appendChild(cell("td", a.granted ? "-" : text(a.reason ? a.reason.replace(/_/g, " ") : null)));
      tr.appendChild(cell("td", a.units && a.units.length ? a.units.join(", ") : "-"));
      tbody.appendChild(tr);
    });
  }

  function renderSummary(st, devices) {
    var on = devices.filter(function (d) { return d.online === true; }).length;
    var b = st.backlog || {};
    var parts = [
      "Cloud link: " + LINK_WORDS[linkState(st.link)] + ".",
      text(b.events) + " undelivered event" + (b.events === 1 ? "" : "s") +
        (typeof b.oldest_age_s === "number" ? ", oldest " + duration(b.oldest_age_s) + " old" : "") + ".",
      "Devices: " + on + " online, " + (devices.length - on) + " offline."
    ];
    var last = (st.access_decisions || [])[0];
    if (last) {
      parts.push("Last access: " + (last.granted ? "granted" : "denied") + " at " + text(last.keypad) + ".");
    }
    var s = parts.join(" ");
    var el = $('[data-role="summary"]');
    // Only a change is announced: the same words are not written again every 2 s.
    if (el.textContent !== s) { el.textContent = s; }
  }

  function render(st, devices) {
    if (!Array.isArray(devices)) { devices = []; }
    $('[data-role="site"]').textContent = "Site " + text(st.site_id) + " · unitgate " + text(st.version);
    renderLinks(st);
    renderBacklog(st);
    renderDevices(devices);
    renderUnits(st.units_by_status || {});
    renderAccess(st.access_decisions || []);
    renderSummary(st, devices);
    var now = new Date();
    var t = $('[data-role="updated"]');
    t.dateTime = now.toISOString();
    t.textContent = now.toLocaleTimeString();
    $("#main").dataset.loaded = "true";
  }

  async function poll() {
    if (inflight) { return; } // the read under way schedules the next one
    clearTimeout(timer);
    var token = loadToken();
    if (!token) { return; }
    inflight = true;
    try {
      var both = await Promise.all([get("/v1/status?detail=full", token), get("/v1/devices", token)]);
      if (loadToken() !== token) { return; } // signed out meanwhile
      showDashboard();
      render(both[0], both[1]);
      lastOk = Date.now();
      setStale(null);
    } catch (e) {
      if (!(e instanceof Failure)) { e = new Failure(String(e && e.message || e)); }
      if (e.auth) {
        forgetToken();
        showLogin(e.message);
      } else {
        showDashboard();
        setStale(e.message);
      }
    } finally {
      inflight = false;
      if (loadToken() && !document.hidden) { timer = setTimeout(poll, PERIOD_MS); }
    }
  }

  function init() {
    $("#login").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var input = $("#token");
      var t = input.value.trim();
      if (!t) { showLogin("Enter the access token."); return; }
      input.value = "";
      saveToken(t);
      $('[data-role="login-error"]').textContent = "Checking…";
      poll();
    });
    $("#refresh").addEventListener("click", function () { poll(); });
    $("#signout").addEventListener("click", function () {
      forgetToken();
      showLogin("");
    });
    // A hidden tab stops polling; it reads again as soon as it is shown.
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) { poll(); }
    });
    if (loadToken()) { poll(); } else { showLogin(""); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
