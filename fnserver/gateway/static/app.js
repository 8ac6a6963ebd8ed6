// The fnserver dashboard: plain JavaScript over the /v1 API (docs/HTTP.md), no framework.
// Everything the server sends is shown with textContent, never parsed as HTML.
'use strict';

const TOKEN_KEY = 'fnserver.token';
const NEEDS_TOKEN = 'This server needs a token';

const $ = (id) => document.getElementById(id);

/** The selected function's name, or null. */
let selected = null;

// -- talking to the server ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

function storedToken() {
  return localStorage.getItem(TOKEN_KEY) || '';
}

/** One request; the parsed JSON reply, or an ApiError carrying the server's {code, message, details}. */
async function api(method, path, { body, headers } = {}) {
  const sent = new Headers(headers || {});
  const token = storedToken();
  if (token) sent.set('Authorization', 'Bearer ' + token);
  let reply;
  try {
    reply = await fetch(path, { method, headers: sent, body, cache: 'no-store' });
  } catch (err) {
    throw new ApiError(0, 'UNREACHABLE', 'the server could not be reached (' + err.message + ')');
  }
  const text = await reply.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!reply.ok) {
    if (data && typeof data.code === 'string') {
      throw new ApiError(reply.status, data.code, data.message || '', data.details);
    }
    throw new ApiError(reply.status, 'HTTP ' + reply.status, text.trim() || reply.statusText);
  }
  return data;
}

/** `/v1/functions/NAME` or `/v1/functions/NAME@VERSION`, each part URL-encoded. */
function functionPath(name, version) {
  let path = '/v1/functions/' + encodeURIComponent(name);
  if (version) path += '@' + encodeURIComponent(version);
  return path;
}

// -- small DOM and formatting helpers -------------------------------------------------------

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

/** A table row; each cell is a Node or a value shown as text. */
function row(cells) {
  const tr = document.createElement('tr');
  for (const cell of cells) {
    const td = document.createElement('td');
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell === null || cell === undefined ? '' : String(cell);
    tr.append(td);
  }
  return tr;
}

/** A <dl> of [term, value] pairs. */
function fillList(dl, pairs) {
  dl.replaceChildren();
  for (const [term, value] of pairs) dl.append(el('dt', term), el('dd', value));
}

function formatUs(us) {
  if (typeof us !== 'number') return '–';
  if (us < 1000) return us + ' µs';
  if (us < 1e6) return (us / 1000).toFixed(2) + ' ms';
  return (us / 1e6).toFixed(2) + ' s';
}

function formatMs(ms) {
  return typeof ms === 'number' ? formatUs(Math.round(ms * 1000)) : '–';
}

function formatBytes(n) {
  if (typeof n !== 'number') return '–';
  if (n < 1024) return n + ' B';
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
  return (n / (1024 * 1024)).toFixed(1) + ' MiB';
}

/** An ISO 8601 string or a Unix time in seconds, in the browser's local time. */
function formatTime(value) {
  if (value === null || value === undefined || value === '') return '–';
  const date = typeof value === 'number' ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

function formatLimits(limits) {
  if (!limits) return '';
  const parts = [];
  if (limits.timeout_ms !== undefined) parts.push(limits.timeout_ms + ' ms');
  if (limits.memory_mb !== undefined) parts.push(limits.memory_mb + ' MiB');
  if (limits.fuel !== undefined && limits.fuel !== null) parts.push(limits.fuel + ' fuel');
  return parts.join(', ');
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- messages -------------------------------------------------------------------------------

function showNotice(text, isError) {
  const notice = $('notice');
  notice.textContent = text;
  notice.classList.toggle('is-error', Boolean(isError));
  notice.hidden = false;
}

function clearNotice() {
  $('notice').hidden = true;
  $('notice').textContent = '';
}

/** A failed load: a 401 asks for a token, anything else names the error. */
function reportLoadError(err) {
  if (err.status === 401) {
    showNotice(storedToken()
      ? NEEDS_TOKEN + ': the token given was refused (' + err.message + ').'
      : NEEDS_TOKEN + ': enter it above.', true);
    $('token').focus();
  } else {
    showNotice(err.code + ': ' + err.message, true);
  }
}

/** An error reply in full: code, status, message, the build log and the other details. */
function showError(box, err) {
  box.replaceChildren();
  const head = el('p');
  head.append(el('strong', err.code), document.createTextNode(' ' + err.message));
  if (err.status) head.append(el('span', ' (HTTP ' + err.status + ')', 'muted'));
  box.append(head);
  if (err.status === 401) box.append(el('p', NEEDS_TOKEN + ': enter it above.'));
  const details = Object.entries(err.details || {});
  const rest = details.filter(([key]) => key !== 'log');
  if (rest.length) {
    const dl = el('dl');
    fillList(dl, rest.map(([key, value]) => [key, typeof value === 'string' ? value : JSON.stringify(value)]));
    box.append(dl);
  }
  const log = details.find(([key]) => key === 'log');
  if (log) box.append(el('h4', 'Log'), el('pre', log[1]));
  box.hidden = false;
}

// -- functions ------------------------------------------------------------------------------

async function loadWhoami() {
  try {
    const me = await api('GET', '/v1/whoami');
    $('whoami').textContent = 'tenant ' + me.tenant + ' · ' + me.role;
  } catch {
    $('whoami').textContent = '';
  }
}

/** The function list; the functions, or null when it could not be read. */
async function loadFunctions() {
  const list = $('functions');
  let data;
  try {
    data = await api('GET', '/v1/functions');
  } catch (err) {
    list.replaceChildren();
    $('functions-empty').hidden = true;
    reportLoadError(err);
    return null;
  }
  clearNotice();
  const functions = data.functions || [];
  list.replaceChildren(...functions.map((fn) => {
    const item = el('li', null, 'function');
    item.dataset.name = fn.name;
    item.tabIndex = 0;
    item.setAttribute('role', 'button');
    item.classList.toggle('active', fn.name === selected);
    const meta = ['v' + fn.latest, fn.kind].filter(Boolean).join(' · ');
    item.append(el('span', fn.name, 'name'), el('span', meta, 'meta'));
    return item;
  }));
  $('functions-empty').hidden = functions.length > 0;
  return functions;
}

function nameFromHash() {
  const match = /^#fn=(.+)$/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

function showSections(visible) {
  for (const id of ['details', 'invoke', 'recent', 'stats-section']) $(id).hidden = !visible;
  $('placeholder').hidden = visible;
}

function clearResult() {
  $('error').hidden = true;
  $('error').replaceChildren();
  $('result').hidden = true;
  for (const id of ['output', 'stderr', 'exit-code']) $(id).textContent = '';
  $('timings').replaceChildren();
}

async function select(name, { keepResult = false } = {}) {
  if (name !== selected) {
    keepResult = false;
    $('invoke-version').value = '';
  }
  selected = name;
  history.replaceState(null, '', '#fn=' + encodeURIComponent(name));
  for (const item of $('functions').children) item.classList.toggle('active', item.dataset.name === name);
  if (!keepResult) clearResult();
  $('function-name').textContent = name;
  showSections(true);
  await Promise.all([loadDetails(name), loadLogs(name), loadStats(name)]);
}

function unselect() {
  selected = null;
  showSections(false);
}

/** Pages of versions fetched at most: 2,000 versions, the most a person reads in a table. */
const MAX_VERSION_PAGES = 20;

/** The function with all its versions (page by page, up to MAX_VERSION_PAGES). */
async function fetchFunction(name) {
  const info = await api('GET', functionPath(name) + '?limit=100');
  const versions = [...(info.versions || [])];
  let cursor = info.next_cursor;
  for (let page = 1; cursor !== null && cursor !== undefined && page < MAX_VERSION_PAGES; page++) {
    const next = await api('GET', functionPath(name) + '?limit=100&cursor=' + encodeURIComponent(cursor));
    versions.push(...(next.versions || []));
    cursor = next.next_cursor;
  }
  return { ...info, versions, next_cursor: cursor };
}

async function loadDetails(name) {
  let info;
  try {
    info = await fetchFunction(name);
  } catch (err) {
    if (selected === name) reportLoadError(err);
    return;
  }
  if (selected !== name) return;
  const versions = info.versions.slice().sort((a, b) => b.version - a.version);
  const newest = versions.find((v) => v.version === info.latest) || versions[0];
  $('function-description').textContent = (newest && newest.description) || '';

  $('versions').replaceChildren(...versions.map((v) => {
    const number = el('span', v.version);
    const cell = document.createDocumentFragment();
    cell.append(number);
    if (v.version === info.latest) cell.append(' ', el('span', 'latest', 'badge'));
    const mode = v.mode + (v.artifacts && v.artifacts.length > 1 ? ' (' + v.artifacts.join(', ') + ')' : '');
    return row([cell, v.kind, mode, formatTime(v.created), formatBytes(v.size),
      (v.aliases || []).join(', '), formatLimits(v.limits)]);
  }));
  $('versions-more').hidden = info.next_cursor === null || info.next_cursor === undefined;

  const aliases = Object.entries(info.aliases || {}).sort(([a], [b]) => a.localeCompare(b));
  $('aliases').replaceChildren(...aliases.map(([alias, version]) => el('li', alias + ' → ' + version)));
  if (!aliases.length) $('aliases').append(el('li', 'none', 'muted'));

  const options = ['latest', ...aliases.map(([alias]) => alias), ...versions.map((v) => String(v.version))];
  $('invoke-version-options').replaceChildren(...options.map((value) => {
    const option = el('option');
    option.value = value;
    return option;
  }));
}

/** The recent invocations, newest first; the records, or null when they could not be read. */
async function loadLogs(name) {
  let data;
  try {
    data = await api('GET', functionPath(name) + '/logs?limit=20');
  } catch (err) {
    if (selected === name && err.status !== 404) reportLoadError(err);
    data = { records: [] };
  }
  if (selected !== name) return null;
  const records = data.records || [];
  $('logs').replaceChildren(...records.slice().reverse().map((r) => {
    const outcome = r.error ? el('span', r.error, 'bad') : el('span', 'exit ' + r.exit_code, r.exit_code === 0 ? 'good' : 'bad');
    return row([formatTime(r.started), r.version, outcome, formatUs(r.run_us), formatUs(r.queue_us),
      formatUs(r.wall_us), formatBytes(r.output_size), r.cold ? 'cold' : 'warm', r.runtime, r.mode,
      el('code', r.id), el('code', r.stderr_tail || '', 'tail')]);
  }));
  $('logs-empty').hidden = records.length > 0;
  return records;
}

const GAUGES = {
  processes: 'serving processes',
  connections: 'connections',
  async_queued: 'async calls queued',
  waiting: 'calls waiting for a slot',
  workers_total: 'native workers',
  workers_busy: 'native workers busy',
  workers_idle: 'native workers idle',
  wasm_slots: 'wasm slots',
  wasm_running: 'wasm calls running',
  builds_running: 'builds running',
  loop_lag_ms: 'event loop lag (ms)',
};

async function loadStats(name) {
  let data;
  try {
    data = await api('GET', functionPath(name) + '/stats');
  } catch (err) {
    if (selected === name && err.status !== 404) reportLoadError(err);
    return;
  }
  if (selected !== name) return;
  const box = $('stats');
  box.replaceChildren();
  const versions = (data.functions || []).slice().sort((a, b) => b.version - a.version);
  if (versions.length) {
    const table = el('table');
    const head = el('tr');
    for (const title of ['Version', 'Calls', 'Errors', 'Warm', 'Cold', 'p50', 'p99', 'Mean']) head.append(el('th', title));
    table.append(el('thead'), el('tbody'));
    table.tHead.append(head);
    for (const s of versions) {
      const errors = Object.entries(s.errors || {}).map(([code, n]) => code + ': ' + n).join(', ') || '0';
      const mean = s.calls && typeof s.total_ms === 'number' ? s.total_ms / s.calls : null;
      table.tBodies[0].append(row([s.version, s.calls, errors, s.warm, s.cold,
        formatMs(s.p50_ms), formatMs(s.p99_ms), formatMs(mean)]));
    }
    box.append(table);
  } else {
    box.append(el('p', 'No calls yet.', 'muted'));
  }
  if (data.server) {
    box.append(el('h4', 'Server'));
    const dl = el('dl', null, 'gauges');
    fillList(dl, Object.entries(data.server).map(([key, value]) => [GAUGES[key] || key.replaceAll('_', ' '), value]));
    box.append(dl);
  }
}

// -- invoking -------------------------------------------------------------------------------

function showResult(r) {
  $('exit-code').textContent = r.exit_code;
  $('exit-code').className = r.exit_code === 0 ? 'good' : 'bad';
  $('truncated').hidden = !r.truncated;
  $('output').textContent = r.output;
  $('stderr').textContent = r.stderr;
  fillList($('timings'), [
    ['version', r.version],
    ['mode', r.mode],
    ['start', r.cold ? 'cold' : 'warm'],
    ['run (duration_us)', formatUs(r.duration_us)],
    ['queue (queue_us)', formatUs(r.queue_us)],
    ['wall (wall_us)', formatUs(r.wall_us)],
    ['invocation', r.id],
  ]);
  $('result').hidden = false;
}

/** After a call: its record reaches the store within a moment, so look until it is there. */
async function refreshAfterCall(name, id) {
  for (let attempt = 0; attempt < 12; attempt++) {
    const records = await loadLogs(name);
    if (records === null || (id ? records.some((r) => r.id === id) : attempt > 0)) break;
    await delay(250);
  }
  await loadStats(name);
}

async function invoke(event) {
  event.preventDefault();
  const name = selected;
  if (!name) return;
  const version = $('invoke-version').value.trim();
  const mode = $('invoke-mode').value;
  let path = functionPath(name, version) + '/invoke';
  if (mode) path += '?mode=' + encodeURIComponent(mode);
  const button = $('invoke-button');
  button.disabled = true;
  clearResult();
  let id = null;
  try {
    const result = await api('POST', path, {
      body: $('invoke-input').value,
      headers: { 'Accept': 'application/json', 'Content-Type': 'application/octet-stream' },
    });
    if (selected !== name) return;
    showResult(result);
    id = result.id;
  } catch (err) {
    if (selected !== name) return;
    showError($('error'), err);
    if (err.status === 401) return;
  } finally {
    button.disabled = false;
  }
  await refreshAfterCall(name, id);
}

// -- start ----------------------------------------------------------------------------------

async function reload({ keepResult = true } = {}) {
  const [functions] = await Promise.all([loadFunctions(), loadWhoami()]);
  const wanted = selected || nameFromHash();
  if (functions && wanted && functions.some((fn) => fn.name === wanted)) {
    await select(wanted, { keepResult });
  } else {
    unselect();
  }
}

function start() {
  $('token').value = storedToken();
  $('token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('token').value.trim();
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
    reload();
  });
  $('refresh').addEventListener('click', () => reload());
  const list = $('functions');
  list.addEventListener('click', (event) => {
    const item = event.target.closest('[data-name]');
    if (item) select(item.dataset.name);
  });
  list.addEventListener('keydown', (event) => {
    const item = event.target.closest('[data-name]');
    if (item && (event.key === 'Enter' || event.key === ' ')) {
      event.preventDefault();
      select(item.dataset.name);
    }
  });
  $('invoke-form').addEventListener('submit', invoke);
  reload({ keepResult: false });
}

start();
