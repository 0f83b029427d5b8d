// Shared by the dashboard's pages: no dependencies, no build step.
'use strict';
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
// UTC ISO-8601, to the second, whatever the browser's locale.
function iso(t) { return t ? new Date(t * 1000).toISOString().replace(/\.\d{3}Z$/, 'Z') : '-'; }
// A duration in seconds as "850ms", "12.3s", "4m05s" or "2h03m".
function dur(s) {
  if (s === null || s === undefined) return '-';
  if (s < 1) return Math.round(s * 1000) + 'ms';
  if (s < 60) return s.toFixed(1) + 's';
  const m = Math.floor(s / 60), sec = Math.floor(s % 60);
  if (m < 60) return m + 'm' + String(sec).padStart(2, '0') + 's';
  return Math.floor(m / 60) + 'h' + String(m % 60).padStart(2, '0') + 'm';
}
function plural(n, one, many) { return n + ' ' + (n === 1 ? one : (many || one + 's')); }
// The server's clock: "now" from its last answer, advanced by ours since.
const clock = {server: 0, local: 0, set(now) { this.server = now; this.local = Date.now() / 1000; },
  now() { return this.server ? this.server + (Date.now() / 1000 - this.local) : Date.now() / 1000; }};
// Who is looking: {operate, csrf}; actions are shown only to operators.
let session = {operate: false, csrf: null};
async function loadSession() {
  try { const r = await fetch('/api/session'); if (r.ok) session = await r.json(); } catch (e) { /* read-only */ }
  document.body.dataset.operate = session.operate ? 'yes' : 'no';
  return session;
}
// A dashboard action: POST with the CSRF header; shows the outcome in #notice.
async function act(path, what) {
  const headers = {};
  if (session.csrf) headers['X-Braid-CSRF'] = session.csrf;
  const r = await fetch(path, {method: 'POST', headers, credentials: 'same-origin'});
  let body = {};
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  const notice = document.getElementById('notice');
  if (notice) {
    notice.textContent = r.ok ? what + ': done' : what + ': ' + (body.error || r.status);
    notice.className = r.ok ? 'notice' : 'notice error';
  }
  return r.ok;
}
