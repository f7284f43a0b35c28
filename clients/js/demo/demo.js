// The demo chat: everything it does goes through the browser client (quickim.js).
import { QuickimClient } from './quickim.js';

const $ = (selector) => document.querySelector(selector);
const params = new URLSearchParams(location.search);
const SYSTEM = { '-1': 'created the conversation', '-2': 'joined', '-3': 'left', '-4': 'removed', '-5': 'archive changed', '-6': 'message revised', '-7': 'details changed', '-8': 'roles changed' };

let client = null;
let me = null;
let current = null;
let devTokens = true;
const conversations = new Map(); // conversation_id → row of the list
const messages = new Map(); // conversation_id → Map(msg_id → message) of the open chat
const typing = new Map(); // user → timer

function notice(text) {
  const el = $('#notice');
  el.textContent = text;
  el.classList.add('show');
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => el.classList.remove('show'), 3000);
}

function transportsFor(choice) {
  return choice === 'auto' ? ['ws', 'sse', 'poll'] : [choice];
}

async function devToken(user) {
  const res = await fetch('/demo/token', { method: 'POST', body: JSON.stringify({ user_id: user }) });
  const body = await res.json().catch(() => null);
  if (res.status === 404 || res.status === 405) {
    devTokens = false;
    throw new Error('this server gives no demo tokens: paste a token from your backend');
  }
  if (!body || body.code !== 0) throw new Error(body ? body.error : `HTTP ${res.status}`);
  return body.data.token;
}

async function signIn(user, pastedToken) {
  signOut();
  const getToken = pastedToken ? () => pastedToken : () => devToken(user);
  client = new QuickimClient({ getToken, transports: transportsFor($('#transport').value) });
  window.quickimDemo = { client };
  client.on('state', renderStatus);
  client.on('message', onMessage);
  client.on('signal', onSignal);
  client.on('error', (e) => console.warn('quickim:', e.message));
  client.on('kicked', () => notice('signed out by the server'));
  client.on('resync', async (e) => {
    notice(`resynchronised (${e.reason})`);
    await e.reload();
    await loadList();
    if (current) await openConversation(current);
  });
  try {
    await client.connect();
  } catch (e) {
    notice(e.message);
    client = null;
    return;
  }
  me = client.userId;
  $('#signin').hidden = true;
  $('#me').hidden = false;
  $('#whoami').textContent = `signed in as ${me}`;
  document.title = `${me} · quickim demo chat`;
  await loadList();
  const first = params.get('room') || (conversations.has('demo-room') ? 'demo-room' : conversations.keys().next().value);
  if (first) await openConversation(first);
}

function signOut() {
  client?.disconnect();
  client = null;
  me = null;
  current = null;
  conversations.clear();
  messages.clear();
  $('#conversations').replaceChildren();
  $('#messages').replaceChildren();
  $('#title').textContent = 'Sign in to chat';
  $('#signin').hidden = false;
  $('#me').hidden = true;
  setComposer(false);
  renderStatus({ state: 'disconnected', transport: null, leader: false });
}

function renderStatus(s) {
  const el = $('#status');
  el.dataset.state = s.state;
  el.dataset.transport = s.transport || '';
  const parts = [s.state];
  if (s.transport) parts.push(s.transport);
  if (client && s.state !== 'disconnected') parts.push(s.leader ? 'this tab holds the connection' : 'shared with another tab');
  if (s.state === 'disconnected' && s.retryInMs !== undefined) parts.push(`retry in ${(s.retryInMs / 1000).toFixed(1)} s`);
  el.querySelector('span').textContent = parts.join(' · ');
}

async function loadList() {
  if (!client) return;
  const list = await client.allConversations();
  conversations.clear();
  for (const c of list) conversations.set(c.conversation_id, c);
  renderList();
}

function renderList() {
  const ul = $('#conversations');
  const rows = [...conversations.values()].sort((a, b) => b.last_send_time - a.last_send_time);
  ul.replaceChildren(
    ...rows.map((c) => {
      const li = document.createElement('li');
      li.dataset.id = c.conversation_id;
      li.classList.toggle('active', c.conversation_id === current);
      const name = document.createElement('span');
      name.className = 'name';
      name.textContent = c.title || c.conversation_id;
      const last = document.createElement('span');
      last.className = 'last';
      last.textContent = c.last_msg ? preview(c.last_msg) : '';
      const badge = document.createElement('span');
      badge.className = 'badge';
      badge.dataset.n = String(c.unread);
      badge.textContent = c.unread ? String(c.unread) : '';
      li.append(name, badge, last);
      li.onclick = () => openConversation(c.conversation_id);
      return li;
    }),
  );
}

function preview(m) {
  if (m.type < 0) return SYSTEM[m.type] || 'system';
  return `${m.from}: ${m.content}`;
}

async function openConversation(id) {
  current = id;
  const c = conversations.get(id);
  $('#title').textContent = c ? c.title || id : id;
  const held = new Map();
  messages.set(id, held);
  for (const m of await client.history(id)) held.set(m.msg_id, m);
  renderMessages();
  setComposer(true);
  renderList();
  await readUpTo(id);
}

async function readUpTo(id) {
  const held = messages.get(id);
  const last = held ? Math.max(0, ...held.keys()) : 0;
  const c = conversations.get(id);
  if (!last || !c || (c.read_msg_id >= last && c.unread === 0)) return;
  const answer = await client.markRead(id, last);
  c.read_msg_id = answer.read_msg_id;
  c.unread = answer.unread;
  renderList();
}

function renderMessages() {
  const ol = $('#messages');
  const held = messages.get(current) || new Map();
  ol.replaceChildren(...[...held.values()].sort((a, b) => a.msg_id - b.msg_id).map(renderMessage));
  ol.scrollTop = ol.scrollHeight;
}

function renderMessage(m) {
  const li = document.createElement('li');
  li.dataset.msgId = String(m.msg_id);
  if (m.type < 0) {
    li.className = 'system';
    let who = '';
    try {
      const body = JSON.parse(m.content);
      who = (body.user_ids || []).join(', ') || body.by || '';
    } catch {
      who = '';
    }
    li.textContent = `${who} ${SYSTEM[m.type] || 'system message'}`.trim();
    return li;
  }
  if (m.from === me) li.className = 'mine';
  const from = document.createElement('span');
  from.className = 'from';
  from.textContent = m.from;
  const text = document.createElement('span');
  text.className = 'text';
  text.textContent = m.recalled ? '(recalled)' : m.content;
  const time = document.createElement('time');
  time.textContent = new Date(m.send_time).toLocaleTimeString();
  li.append(from, text, time);
  return li;
}

function onMessage(m) {
  const c = conversations.get(m.conversation_id);
  if (!c || m.type === -2 || m.type === -3 || m.type === -4 || m.type === -7) {
    // A new conversation, or its members or details changed: the list says it best.
    loadList().catch((e) => notice(e.message));
  }
  if (c) {
    c.last_msg_id = m.msg_id;
    c.last_send_time = m.send_time;
    if (m.type !== -6) c.last_msg = m;
    if (m.from !== me && m.conversation_id !== current && m.type >= 0) c.unread += 1;
  }
  if (m.conversation_id === current) {
    const held = messages.get(current);
    held.set(m.msg_id, m);
    if (m.type === -6) applyRevision(held, m);
    renderMessages();
    if (document.visibilityState === 'visible') readUpTo(current).catch((e) => notice(e.message));
  }
  if (m.from && typing.has(m.from)) stopTyping(m.from);
  renderList();
}

function applyRevision(held, m) {
  try {
    const r = JSON.parse(m.content);
    const target = held.get(r.msg_id);
    if (!target) return;
    if (r.action === 'edit' || r.action === 'finish') target.content = r.content;
    if (r.action === 'recall' || r.action === 'delete' || r.action === 'cancel') target.recalled = true;
  } catch {
    /* not a revision we know */
  }
}

function onSignal(s) {
  if (s.conversation_id !== current) return;
  if (s.kind === 'typing') {
    clearTimeout(typing.get(s.from));
    typing.set(s.from, setTimeout(() => stopTyping(s.from), s.expires_in_ms || 6000));
  } else if (s.kind === 'typing_stopped') {
    stopTyping(s.from);
  }
  renderTyping();
}

function stopTyping(user) {
  clearTimeout(typing.get(user));
  typing.delete(user);
  renderTyping();
}

function renderTyping() {
  const who = [...typing.keys()];
  $('#typing').textContent = who.length ? `${who.join(', ')} ${who.length > 1 ? 'are' : 'is'} typing…` : '';
}

function setComposer(on) {
  $('#text').disabled = !on;
  $('#composer button').disabled = !on;
}

// --- wiring ---------------------------------------------------------------------------------

$('#signin').onsubmit = (e) => {
  e.preventDefault();
  const token = $('#token').value.trim();
  signIn($('#user').value.trim(), devTokens ? null : token);
};
for (const b of document.querySelectorAll('.quick button')) b.onclick = () => signIn(b.dataset.user);
$('#signout').onclick = signOut;
$('#transport').onchange = () => client?.setTransports(transportsFor($('#transport').value));

let lastTyping = 0;
$('#text').oninput = () => {
  if (!current || Date.now() - lastTyping < 3000) return;
  lastTyping = Date.now();
  client.signal(current, 'typing').catch(() => {});
};
$('#composer').onsubmit = async (e) => {
  e.preventDefault();
  const input = $('#text');
  const text = input.value.trim();
  if (!text || !current) return;
  input.value = '';
  lastTyping = 0;
  try {
    await client.send(current, text);
  } catch (err) {
    notice(`not sent: ${err.message}`);
    input.value = text;
  }
};
$('#newroom').onsubmit = async (e) => {
  e.preventDefault();
  const title = $('#roomtitle').value.trim();
  if (!title) return;
  try {
    const { conversation_id } = await client.createConversation({ conversation_type: 2, joinable: true, title });
    $('#roomtitle').value = '';
    await loadList();
    await openConversation(conversation_id);
    notice(`others join with the id ${conversation_id}`);
  } catch (err) {
    notice(err.message);
  }
};
$('#joinroom').onsubmit = async (e) => {
  e.preventDefault();
  const id = $('#roomid').value.trim();
  if (!id) return;
  try {
    await client.joinConversation(id);
    $('#roomid').value = '';
    await loadList();
    await openConversation(id);
  } catch (err) {
    notice(err.message);
  }
};
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && current) readUpTo(current).catch(() => {});
});

// Is there a demo token route? Without one, sign in with a token from your backend.
// (A gateway without the route answers 404, or 405 where it serves the page.)
fetch('/demo/token', { method: 'POST', body: '{}' }).then((res) => {
  if (res.status === 404 || res.status === 405) {
    devTokens = false;
    $('#user').hidden = true;
    $('#user').required = false;
    $('#token').hidden = false;
    $('#token').required = true;
    document.querySelector('.quick').hidden = true;
  }
});

if (params.get('transport')) $('#transport').value = params.get('transport');
if (params.get('user')) signIn(params.get('user'));
