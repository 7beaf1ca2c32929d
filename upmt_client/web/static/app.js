// The web GUI of upmt-client: polls /api/status every second and shows the
// VIPA, the tunnels (with an RTT chart), the applications (each with a
// handover control) and the handover log. Plain DOM, no framework; every
// value from the daemon goes in as text (textContent), never as markup: an
// application's name is whatever a process calls itself.
"use strict";

const TOKEN = document.querySelector('meta[name="upmt-token"]').content;
const POLL_MS = 1000;
const HISTORY = 120; // chart samples per tunnel: two minutes
const COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#8250df", "#bf8700", "#0a7c86"];
const SVG = "http://www.w3.org/2000/svg";

const rtt = new Map(); // interface -> [rtt_ms or null, ...], oldest first
let interfaces = []; // in the client's order, for the colours and the selects
let liveInterfaces = [];

function api(path, options = {}) {
  const headers = { "X-UPMT-Token": TOKEN, ...(options.headers || {}) };
  return fetch(path, { ...options, headers, cache: "no-store" }).then(async (answer) => {
    const body = await answer.json().catch(() => ({ ok: false, error: answer.statusText }));
    if (!answer.ok) throw new Error(body.error || `HTTP ${answer.status}`);
    return body;
  });
}

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function cell(row, value, field, numeric = false) {
  const td = document.createElement("td");
  td.textContent = value;
  if (field) td.dataset.field = field;
  if (numeric) td.className = "num";
  row.appendChild(td);
  return td;
}

function ms(value) {
  return value === null || value === undefined ? "–" : value.toFixed(2);
}

function share(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)} %`;
}

function bytes(n) {
  if (n < 1000) return `${n} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let value = n;
  let unit = -1;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

// Rows are kept per key and updated in place, so that a select the user has
// opened or set survives the next poll.
function syncRows(tbody, items, keyOf, create, update, emptyText, columns) {
  const wanted = new Set(items.map(keyOf));
  for (const row of [...tbody.rows]) {
    if (!wanted.has(row.dataset.key)) row.remove();
  }
  const byKey = new Map([...tbody.rows].map((row) => [row.dataset.key, row]));
  items.forEach((item, index) => {
    const key = keyOf(item);
    let row = byKey.get(key);
    if (!row) {
      row = create(item);
      row.dataset.key = key;
    }
    update(row, item);
    if (tbody.rows[index] !== row) tbody.insertBefore(row, tbody.rows[index] || null);
  });
  if (items.length === 0) {
    const row = tbody.insertRow();
    row.className = "empty";
    row.dataset.key = "";
    const td = row.insertCell();
    td.colSpan = columns;
    td.textContent = emptyText;
  }
}

function setCells(row, values) {
  values.forEach((value, i) => {
    if (row.cells[i].textContent !== value) row.cells[i].textContent = value;
  });
}

// -- tunnels ------------------------------------------------------------------
function showTunnels(tunnels) {
  syncRows(
    document.querySelector("#tunnels tbody"),
    tunnels,
    (t) => t.interface,
    (t) => {
      const row = document.createElement("tr");
      row.dataset.interface = t.interface;
      const fields = ["interface", "state", "rtt", "jitter", "loss", "goodput"];
      fields.forEach((f, i) => cell(row, "", f, i >= 2));
      ["bytes-up", "bytes-down"].forEach((f) => cell(row, "", f, true));
      cell(row, "", "observed");
      return row;
    },
    (row, t) => {
      setCells(row, [
        t.interface,
        t.state,
        ms(t.rtt_ms),
        ms(t.jitter_ms),
        share(t.loss),
        String(t.goodput_kbit_s),
        bytes(t.bytes_up),
        bytes(t.bytes_down),
        t.observed || "–",
      ]);
      const state = row.cells[1];
      state.className = ["up", "down", "dead"].includes(t.state) ? `state-${t.state}` : "state-other";
      row.dataset.state = t.state;
    },
    "no tunnel",
    9,
  );
}

function recordRtt(tunnels) {
  for (const t of tunnels) {
    if (!rtt.has(t.interface)) rtt.set(t.interface, []);
    const samples = rtt.get(t.interface);
    samples.push(t.state === "up" ? t.rtt_ms : null);
    if (samples.length > HISTORY) samples.shift();
  }
}

function svg(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  return element;
}

function drawChart() {
  const chart = document.getElementById("rtt-chart");
  const width = 600;
  const height = 160;
  const left = 36;
  const above = 8; // room for the top label
  const bottom = 14;
  const values = [...rtt.values()].flat().filter((v) => v !== null);
  // A round scale (1, 2, 5, 10, 20, ... ms) that holds the largest RTT of the window.
  const peak = values.length ? Math.max(...values) : 1;
  let top = 1;
  for (let k = 1; top < peak; k += 1) top = [1, 2, 5][k % 3] * 10 ** Math.floor(k / 3);
  chart.replaceChildren();
  for (const fraction of [0, 0.5, 1]) {
    const y = above + (height - above - bottom) * (1 - fraction);
    chart.appendChild(svg("line", { class: "grid", x1: left, x2: width, y1: y, y2: y }));
    const label = svg("text", { x: 2, y: y + 3 });
    label.textContent = String(+(top * fraction).toFixed(1));
    chart.appendChild(label);
  }
  const xOf = (i) => left + ((width - left) * i) / (HISTORY - 1);
  const yOf = (v) => above + (height - above - bottom) * (1 - v / top);
  interfaces.forEach((name, n) => {
    const samples = rtt.get(name) || [];
    const offset = HISTORY - samples.length;
    // A gap (tunnel not up) ends one line and starts the next.
    let points = [];
    const flush = () => {
      if (points.length > 1) {
        chart.appendChild(
          svg("polyline", {
            points: points.join(" "),
            stroke: COLORS[n % COLORS.length],
            "data-interface": name,
          }),
        );
      }
      points = [];
    };
    samples.forEach((v, i) => {
      if (v === null || v === undefined) flush();
      else points.push(`${xOf(offset + i).toFixed(1)},${yOf(v).toFixed(1)}`);
    });
    flush();
  });
  const legend = document.getElementById("rtt-legend");
  legend.replaceChildren();
  interfaces.forEach((name, n) => {
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = COLORS[n % COLORS.length];
    legend.appendChild(swatch);
    legend.appendChild(document.createTextNode(name));
  });
}

// -- applications ---------------------------------------------------------------
function fillTargets(select, current) {
  const wanted = interfaces.join(",") + "|" + liveInterfaces.join(",");
  if (select.dataset.options === wanted) return;
  const chosen = select.value;
  select.replaceChildren();
  for (const name of interfaces) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = liveInterfaces.includes(name) ? name : `${name} (down)`;
    option.disabled = !liveInterfaces.includes(name);
    select.appendChild(option);
  }
  const first = liveInterfaces.find((name) => !current.includes(name)) || liveInterfaces[0];
  select.value = chosen && interfaces.includes(chosen) ? chosen : first || "";
  select.dataset.options = wanted;
}

function handover(app, select, button) {
  const target = select.value;
  button.disabled = true;
  const message = document.getElementById("message");
  message.dataset.state = "busy";
  message.textContent = `handing ${app} over to ${target}…`;
  api("/api/handover", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ app, to: target }),
  })
    .then((answer) => {
      // The next poll offers another interface than the one the application is on now.
      select.dataset.options = "";
      select.selectedIndex = -1;
      message.dataset.state = "ok";
      message.dataset.app = app;
      message.dataset.to = answer.to;
      message.textContent =
        `${app}: moved ${answer.moved} of ${answer.flows} flows to ${answer.to}; ` +
        `anchor: ${answer.anchor}`;
    })
    .catch((error) => {
      message.dataset.state = "error";
      message.textContent = `${app}: ${error.message}`;
    })
    .finally(() => {
      button.disabled = false;
      poll();
    });
}

function showApps(apps) {
  syncRows(
    document.querySelector("#apps tbody"),
    apps,
    (a) => a.app,
    (a) => {
      const row = document.createElement("tr");
      row.dataset.app = a.app;
      cell(row, a.app, "app");
      cell(row, "", "interface");
      cell(row, "", "flows", true);
      cell(row, "", "bytes", true);
      const control = row.insertCell();
      if (a.app !== "(unknown)") {
        // The unknown application has no name to pin; its flows move with their policy.
        const select = document.createElement("select");
        select.dataset.role = "target";
        select.setAttribute("aria-label", `interface for ${a.app}`);
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.role = "handover";
        button.textContent = "Hand over";
        button.addEventListener("click", () => handover(a.app, select, button));
        control.append(select, " ", button);
      }
      return row;
    },
    (row, a) => {
      setCells(row, [a.app, a.interfaces.join(", "), String(a.flows.length), bytes(a.bytes)]);
      row.dataset.interfaces = a.interfaces.join(",");
      const select = row.querySelector("select");
      if (select) fillTargets(select, a.interfaces);
    },
    "no application has a flow",
    5,
  );
}

// -- handovers ------------------------------------------------------------------
function showHandovers(records) {
  // Keyed by what a record says, and by how many alike came before (the same second).
  const seen = new Map();
  const newest = records.slice(-50).map((h) => {
    const base = `${h.at_unix}|${h.app}|${h.from}|${h.to}|${h.reason}`;
    seen.set(base, (seen.get(base) || 0) + 1);
    return { ...h, key: `${base}#${seen.get(base)}` };
  });
  newest.reverse();
  syncRows(
    document.querySelector("#handovers tbody"),
    newest,
    (h) => h.key,
    () => {
      const row = document.createElement("tr");
      for (const f of ["at", "app", "flows", "from", "to", "reason", "detail", "anchor"]) {
        cell(row, "", f, f === "flows");
      }
      return row;
    },
    (row, h) => {
      setCells(row, [
        h.at.replace("T", " "),
        h.app,
        String(h.flows),
        h.from,
        h.to + (h.twin ? `+${h.twin}` : ""),
        h.reason,
        h.detail || "",
        h.anchor || "–",
      ]);
      row.dataset.app = h.app;
      row.dataset.reason = h.reason;
    },
    "no handover yet",
    8,
  );
}

// -- polling --------------------------------------------------------------------
let inFlight = false;

function show(status) {
  text("terminal", status.terminal_id);
  text("vipa", status.vipa || "(not associated)");
  text("anchor", status.anchor);
  text("encryption", status.encryption);
  interfaces = status.tunnels.map((t) => t.interface);
  liveInterfaces = status.tunnels.filter((t) => t.state === "up").map((t) => t.interface);
  showTunnels(status.tunnels);
  recordRtt(status.tunnels);
  drawChart();
  showApps(status.apps);
  showHandovers(status.handovers);
}

function poll() {
  if (inFlight) return;
  inFlight = true;
  const conn = document.getElementById("conn");
  api("/api/status")
    .then((status) => {
      show(status);
      conn.dataset.state = "live";
      conn.textContent = `live, pid ${status.pid}`;
    })
    .catch((error) => {
      conn.dataset.state = "error";
      conn.textContent = `no answer: ${error.message}`;
    })
    .finally(() => {
      inFlight = false;
    });
}

poll();
setInterval(poll, POLL_MS);
