// The tether status page: polls /api/sessions and redraws the table, with a countdown
// for detached sessions between polls. Only textContent is written (no HTML from data).
// A token can be given as #token=... in the URL; it is kept for this tab only.
"use strict";

(function () {
  const POLL_MS = 1000;
  const TICK_MS = 250;
  let token = sessionStorage.getItem("tether-admin-token");

  function takeToken() {
    const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (match) {
      token = decodeURIComponent(match[1]);
      sessionStorage.setItem("tether-admin-token", token);
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  takeToken();
  window.addEventListener("hashchange", takeToken);

  let last = null; // the last answer
  let fetchedAt = 0; // performance.now() when it arrived

  function size(n) {
    const units = [["GiB", 1 << 30], ["MiB", 1 << 20], ["KiB", 1 << 10]];
    for (const [unit, factor] of units) {
      if (n >= factor) return (n / factor).toFixed(1) + " " + unit;
    }
    return n + " B";
  }

  function seconds(s) {
    s = Math.max(0, Math.round(s));
    return s >= 60 ? Math.floor(s / 60) + " min " + (s % 60) + " s" : s + " s";
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  function set(id, text) {
    document.getElementById(id).textContent = text;
  }

  function stateText(s, elapsed) {
    if (s.expires_in === null || s.expires_in === undefined) return s.state;
    const away = s.detached_for + elapsed;
    const left = s.expires_in - elapsed;
    return "detached " + seconds(away) + ", expires in " + seconds(left);
  }

  function render() {
    if (!last) return;
    const elapsed = (performance.now() - fetchedAt) / 1000;
    const body = document.querySelector("#sessions tbody");
    const rows = [];
    for (const s of last.sessions) {
      const tr = document.createElement("tr");
      tr.className = s.state;
      tr.dataset.id = s.id;
      cell(tr, s.id.slice(0, 12), "id").title = s.id;
      const state = cell(tr, stateText(s, elapsed), "state");
      if (s.expires_in !== null && s.expires_in !== undefined) {
        state.classList.add("countdown");
      }
      cell(tr, s.peer);
      cell(tr, s[last.local_name] || "");
      cell(tr, new Date(s.since).toLocaleTimeString());
      cell(tr, size(s.bytes_sent));
      cell(tr, size(s.bytes_received));
      cell(tr, size(s.replay_buffered));
      cell(tr, String(s.resumes));
      rows.push(tr);
    }
    body.replaceChildren(...rows);
    const note = document.getElementById("empty");
    const total = last.totals.sessions;
    note.textContent = rows.length ? "showing " + rows.length + " of " + total +
      " sessions, detached first" : "no sessions";
    note.hidden = rows.length > 0 && rows.length >= total;
  }

  function show(data) {
    last = data;
    fetchedAt = performance.now();
    const t = data.totals;
    set("role", data.role + (t.accepting ? "" : " (not accepting new sessions)"));
    set("local-name", data.local_name);
    set("t-sessions", t.sessions);
    set("t-attached", t.attached);
    set("t-detached", t.detached);
    set("t-started", t.sessions_total);
    set("t-resumes", t.resumes_total);
    set("t-ended", t.ended_total);
    set("t-sent", size(t.bytes_sent));
    set("t-received", size(t.bytes_received));
    set("t-replay", size(t.replay_buffered));
    const events = data.events.map(function (e) {
      const li = document.createElement("li");
      li.textContent = new Date(e.at * 1000).toLocaleTimeString() + "  " + e.session + "  " +
        e.kind + ": " + e.detail;
      return li;
    });
    document.getElementById("events").replaceChildren(...events);
    const status = document.getElementById("connection");
    status.className = "muted";
    status.textContent = "listening on " + data.listening.join(", ") + "; updated " +
      new Date(data.time * 1000).toLocaleTimeString();
    render();
  }

  function failed(text) {
    const status = document.getElementById("connection");
    status.className = "error";
    status.textContent = text;
  }

  async function poll() {
    try {
      const headers = token ? { Authorization: "Bearer " + token } : {};
      const response = await fetch("api/sessions", { headers: headers, cache: "no-store" });
      if (response.status === 401) {
        failed("the admin token is missing or wrong: open this page as …/#token=TOKEN");
      } else if (!response.ok) {
        failed("the admin endpoint answered " + response.status);
      } else {
        show(await response.json());
      }
    } catch (error) {
      failed("cannot reach the admin endpoint: " + error);
    }
    setTimeout(poll, POLL_MS);
  }

  setInterval(render, TICK_MS);
  poll();
})();
