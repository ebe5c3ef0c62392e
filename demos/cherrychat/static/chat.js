// cherrychat's page: login, rooms, messages and the Orbited connection.
//
// Every piece of user text goes into the DOM with textContent, never as HTML. Messages
// arrive pushed by the web app through Orbited and are numbered 1, 2, 3, … per room, so
// the page de-duplicates by id and knows `upTo`, the id below which it has them all. When
// a message arrives past a hole, and each time the connection (re)opens, it asks the web
// app for everything after `upTo` (a node that died lost its mailboxes; the app did not).
//
// What the user has read is kept per user and room in localStorage (the highest message
// id seen), so a reload or another tab does not count seen history as unread; the room on
// screen is kept per tab in sessionStorage, so a reload reopens it.
//
// Each tab has its own connection key, named by a tab id kept in sessionStorage (so a
// reload resumes the same key); each load of the page also has a page id, so the app can
// tell a reloading tab's goodbye from its next hello. The app addresses its pushes to the
// user (every tab at once); the nodes may cap the tabs per user, and a refused tab says so.
//
// Latest-value events: member lists and "is typing" states come tagged (`info.latest`),
// so a tab that fell behind gets only the newest of each; `chat.latest` counts them and
// the events they replaced. The app's offline notices ("would push") show under the
// message they are about.
import { OrbitedClient } from "/orbited-client.mjs";

const $ = (id) => document.getElementById(id);

const chat = {
  me: null,            // {nick, rooms}
  tab: null,           // this tab: {tab, key, route, orbited, token} from POST /tabs
  page: crypto.randomUUID(), // this load of the page
  client: null,        // the OrbitedClient
  closing: false,      // we close the connection ourselves (logout, leaving the page)
  retabs: 0,           // new tab ids taken after a "replaced" (a duplicated tab)
  rooms: new Map(),    // name -> {joined, members, messages: Map(id -> message), upTo, unread, count}
  current: null,       // the room on screen
  connection: { state: "closed", transport: null, detail: null },
  states: [],          // every connection state change, for the curious (and the tests)
  resyncs: 0,
  typing: new Map(),   // room -> Map(nick -> time it expires)
  notes: new Map(),    // "room/id" -> Map(nick -> "needs_push" | "cancel"): offline notices
  latest: { events: 0, replaced: 0, tags: {} }, // tagged events seen, events they replaced
};
window.chat = chat;

async function api(method, path, body) {
  const options = { method, cache: "no-store", credentials: "same-origin", headers: {} };
  if (method !== "GET") {
    options.headers["content-type"] = "application/json";
    options.body = JSON.stringify(body || {});
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (_) { /* empty body */ }
  if (!response.ok) {
    const error = new Error((data && data.error) || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

function room(name) {
  if (!chat.rooms.has(name)) {
    chat.rooms.set(name, { joined: false, members: [], messages: new Map(), upTo: null, unread: 0, count: 0 });
  }
  return chat.rooms.get(name);
}

// -- rendering ----------------------------------------------------------------------

function showError(id, error) { $(id).textContent = error ? String(error.message || error) : ""; }

function renderConnection() {
  const { state, transport, detail } = chat.connection;
  // Closed while we did not close it ourselves: the client gave up for good.
  const dead = state === "closed" && chat.client !== null && !chat.closing;
  $("connection").className = `state-${state}`;
  $("conn-state").textContent = dead ? "disconnected" : state;
  $("conn-transport").textContent = transport ? `via ${transport}` : "";
  $("conn-route").textContent = chat.tab ? `route ${chat.tab.route}` : "";
  $("connection").title = detail ? `last problem: ${detail}` : "connection to Orbited";
  $("conn-banner").hidden = !dead;
  $("conn-reason").textContent = dead ? deadReason(detail) : "";
  $("text").disabled = dead;
  $("send-form").querySelector("button").disabled = dead;
}

// Why the connection ended for good, in words: the per-user tab limit has its own.
function deadReason(detail) {
  const why = String(detail || "closed");
  const max = chat.me && chat.me.max_tabs ? ` (at most ${chat.me.max_tabs} per user)` : "";
  if (why.startsWith("user_limit")) {
    return `Too many tabs open${max}: close another tab of cherrychat, then reload this one.`;
  }
  if (why.startsWith("displaced")) {
    return `This tab was closed because you opened another${max}.`;
  }
  return `Disconnected for good (${why}): new messages will not arrive.`;
}

function renderRooms() {
  const list = $("rooms");
  list.replaceChildren();
  for (const [name, r] of [...chat.rooms.entries()].sort()) {
    r.unread = unreadOf(name, r);
    const li = document.createElement("li");
    li.dataset.room = name;
    li.className = `${r.joined ? "joined" : ""} ${name === chat.current ? "current" : ""}`;
    const label = document.createElement("span");
    label.textContent = name;
    li.append(label);
    const side = document.createElement("span");
    if (r.unread) {
      side.className = "badge";
      side.textContent = String(r.unread);
    } else {
      side.className = "count";
      side.textContent = String(r.joined ? r.members.length : r.count);
    }
    li.append(side);
    li.addEventListener("click", () => openRoom(name).catch((e) => showError("chat-error", e)));
    list.append(li);
  }
}

function messageItem(message) {
  const li = document.createElement("li");
  li.dataset.id = String(message.id);
  li.className = message.kind;
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = new Date(message.time * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const nick = document.createElement("span");
  nick.className = "nick";
  nick.textContent = message.nick;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = message.text;
  li.append(time, nick, text);
  const notes = noteText(message.room, message.id);
  if (notes) {
    const note = document.createElement("span");
    note.className = "push-note";
    note.textContent = notes;
    li.append(note);
  }
  return li;
}

// The offline notices about one message, as shown under it.
function noteText(name, id) {
  const notes = chat.notes.get(`${name}/${id}`);
  if (!notes) return "";
  return [...notes].map(([nick, kind]) => kind === "cancel"
    ? `📱 push to ${nick} cancelled (read)` : `📱 would push to ${nick}`).join(" · ");
}

function addNote(note) {
  const key = `${note.room}/${note.id}`;
  if (!chat.notes.has(key)) chat.notes.set(key, new Map());
  const notes = chat.notes.get(key);
  if (notes.get(note.nick) === "cancel") return; // a cancel is final
  notes.set(note.nick, note.notice);
  if (note.room === chat.current) renderMessages();
}

// "X is typing…": each state expires after a few seconds unless renewed.
const TYPING_SHOWN = 5000;
function setTyping(data) {
  if (!chat.typing.has(data.room)) chat.typing.set(data.room, new Map());
  const typing = chat.typing.get(data.room);
  if (data.typing) typing.set(data.nick, Date.now() + TYPING_SHOWN);
  else typing.delete(data.nick);
  renderTyping();
  if (data.typing) setTimeout(renderTyping, TYPING_SHOWN + 50);
}

function renderTyping() {
  const typing = chat.current && chat.typing.get(chat.current);
  const now = Date.now();
  const who = typing ? [...typing].filter(([, until]) => until > now).map(([nick]) => nick) : [];
  $("typing").textContent = who.length === 0 ? ""
    : `${who.join(", ")} ${who.length === 1 ? "is" : "are"} typing…`;
}

function renderMessages() {
  const list = $("messages");
  const r = chat.current && chat.rooms.get(chat.current);
  list.replaceChildren(...(r ? [...r.messages.values()].sort((a, b) => a.id - b.id).map(messageItem) : []));
  list.scrollTop = list.scrollHeight;
}

function renderMembers() {
  const list = $("members");
  const r = chat.current && chat.rooms.get(chat.current);
  list.replaceChildren();
  for (const member of r ? r.members : []) {
    const li = document.createElement("li");
    li.className = member.online ? "online" : "offline";
    li.dataset.nick = member.nick;
    li.textContent = member.nick + (member.nick === chat.me.nick ? " (you)" : "");
    list.append(li);
  }
}

function renderRoom() {
  const r = chat.current && chat.rooms.get(chat.current);
  $("room-title").textContent = r ? `# ${chat.current}` : "Choose a room";
  $("leave").hidden = !r;
  $("send-form").hidden = !r;
  renderMessages();
  renderMembers();
  renderTyping();
  renderRooms();
}

// -- state changes ------------------------------------------------------------------

// upTo: every message of the room after the history we loaded and up to this id is here.
function advance(r) {
  if (r.upTo === null) return;
  while (r.messages.has(r.upTo + 1)) r.upTo += 1;
}

function addMessage(message) {
  const r = chat.rooms.get(message.room);
  if (!r || !r.joined || r.messages.has(message.id)) return; // left, or seen already
  r.messages.set(message.id, message);
  advance(r);
  if (r.upTo !== null && message.id > r.upTo) scheduleCatchUp(message.room); // a hole
  if (message.room !== chat.current) {
    renderRooms(); // its unread count
    return;
  }
  markRead(message.room);
  // In id order even when a catch-up fills in below messages already shown.
  const list = $("messages");
  const item = messageItem(message);
  const after = [...list.children].find((li) => Number(li.dataset.id) > message.id);
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.insertBefore(item, after || null);
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function setMembers(name, members) {
  const r = chat.rooms.get(name);
  if (!r || !r.joined) return;
  r.members = members;
  if (name === chat.current) renderMembers();
  renderRooms();
}

// -- read state: per user and room, the highest message id seen (localStorage) -------

function readKey() { return `cherrychat.read.${chat.tab ? chat.tab.key[0] : ""}`; }

function readMarks() {
  try { return JSON.parse(localStorage.getItem(readKey())) || {}; } catch (_) { return {}; }
}

function setRead(name, id) {
  const marks = readMarks();
  if (name in marks && marks[name] >= id) return;
  marks[name] = id;
  localStorage.setItem(readKey(), JSON.stringify(marks));
}

function markRead(name) {
  const r = chat.rooms.get(name);
  if (r) setRead(name, Math.max(0, ...r.messages.keys()));
}

// Messages of others after what this user has read, in any tab.
function unreadOf(name, r) {
  if (!r.joined || name === chat.current) return 0;
  const seen = readMarks()[name];
  if (seen === undefined) return 0;
  return [...r.messages.values()].filter((m) => m.id > seen && m.nick !== chat.me.nick).length;
}

// The recent history of a room (ids k..m, no holes): where `upTo` starts.
function applyRoomView(view) {
  const r = room(view.room);
  r.joined = true;
  if (r.upTo === null) r.upTo = view.messages.length ? view.messages[0].id - 1 : 0;
  // First time in this room (in this browser): its history counts as read.
  if (!(view.room in readMarks())) setRead(view.room, Math.max(0, ...view.messages.map((m) => m.id)));
  for (const message of view.messages) addMessage(message);
  advance(r); // pushes that came before this view are already in `messages`
  if ([...r.messages.keys()].some((id) => id > r.upTo)) scheduleCatchUp(view.room);
  setMembers(view.room, view.members);
}

async function openRoom(name) {
  showError("chat-error", null);
  const known = chat.rooms.get(name);
  if (!known || !known.joined) {
    // Only a room the app accepted gets into the list (not a name it refused).
    const view = await api("POST", `/rooms/${encodeURIComponent(name)}/join`);
    applyRoomView(view);
    name = view.room;
  }
  chat.current = name;
  sessionStorage.setItem("cherrychat.room", name);
  markRead(name);
  renderRoom();
  $("text").focus();
}

async function leaveRoom() {
  const name = chat.current;
  if (!name) return;
  await api("POST", `/rooms/${encodeURIComponent(name)}/leave`);
  const r = room(name);
  Object.assign(r, { joined: false, members: [], messages: new Map(), upTo: null, unread: 0 });
  chat.current = null;
  sessionStorage.setItem("cherrychat.room", "");
  renderRoom();
  refreshRooms();
}

async function refreshRooms() {
  const { rooms } = await api("GET", "/rooms");
  for (const info of rooms) {
    const r = room(info.name);
    r.count = info.members;
  }
  renderRooms();
}

// Anything the push stream may have missed: after a reconnect (a new stream, or a gap)
// and when a hole shows, ask the web app for the messages after `upTo`.
async function catchUp(name) {
  const r = chat.rooms.get(name);
  if (!r || !r.joined) return;
  for (;;) {
    // Nothing loaded yet: the recent history is enough; otherwise everything after upTo.
    const path = r.upTo === null ? "" : `/messages?after=${r.upTo}`;
    let view;
    try {
      view = await api("GET", `/rooms/${encodeURIComponent(name)}${path}`);
    } catch (error) {
      if (error.status === 403) { r.joined = false; renderRooms(); return; }
      // The web app is unreachable for a moment: try again, or messages stay missing.
      setTimeout(() => catchUp(name), 1000);
      return;
    }
    if (path) {
      for (const message of view.messages) addMessage(message);
      setMembers(name, view.members);
    } else {
      applyRoomView(view);
    }
    if (!path || view.messages.length < 500) return;
  }
}

// Pushes of messages posted at the same moment may arrive out of order: give the missing
// one a moment before asking the web app.
const pendingCatchUps = new Set();
function scheduleCatchUp(name) {
  if (pendingCatchUps.has(name)) return;
  pendingCatchUps.add(name);
  setTimeout(() => {
    pendingCatchUps.delete(name);
    const r = chat.rooms.get(name);
    if (r && r.upTo !== null && [...r.messages.keys()].some((id) => id > r.upTo)) catchUp(name);
  }, 300);
}

function resyncAll() {
  chat.resyncs += 1;
  for (const [name, r] of chat.rooms) if (r.joined) catchUp(name);
  refreshRooms().catch(() => {});
}

function onPush(data, info) {
  if (info && info.latest) {
    chat.latest.events += 1;
    chat.latest.replaced += info.replaced || 0;
    chat.latest.tags[info.latest] = (chat.latest.tags[info.latest] || 0) + 1;
  }
  if (data.type === "message") addMessage(data);
  else if (data.type === "members") setMembers(data.room, data.members);
  else if (data.type === "typing") setTyping(data);
  else if (data.type === "offline") addNote(data);
  else if (data.type === "logged_out") endSession("You logged out in another tab.");
}

// -- this tab's connection ----------------------------------------------------------

function tabId(fresh) {
  let id = sessionStorage.getItem("cherrychat.tab");
  if (!id || fresh) {
    id = crypto.randomUUID();
    sessionStorage.setItem("cherrychat.tab", id);
  }
  return id;
}

// Tell the app this page is here (again): it pushes to this tab from now on.
async function registerTab(fresh) {
  chat.tab = await api("POST", "/tabs", { tab: tabId(fresh), page: chat.page });
  return chat.tab;
}

// The session is over (logged out in another tab, or expired): back to the login.
function endSession(notice) {
  if (chat.closing) return;
  chat.closing = true;
  if (chat.client) chat.client.close();
  sessionStorage.setItem("cherrychat.notice", notice);
  location.reload();
}

function connect() {
  let first = chat.tab.token;
  const client = new OrbitedClient(chat.tab.orbited, {
    token: async () => {
      if (first) { const token = first; first = null; return token; }
      const tab = encodeURIComponent(chat.tab.tab);
      const response = await fetch(`/token?tab=${tab}`, { cache: "no-store", credentials: "same-origin" });
      if (response.status === 401) endSession("Your session has ended: log in again.");
      if (!response.ok) throw new Error(`token: HTTP ${response.status}`);
      return response.text();
    },
    base: 500, max: 8000,
    // A node moved this tab's key to another route (e.g. a rehash): ask the app where
    // that route's browsers connect.
    locate: async (route) => {
      const where = await api("GET", `/routes/${route}`);
      chat.tab.route = where.route;
      renderConnection();
      return where.orbited;
    },
    onMessage: onPush,
    onState: (state, info) => {
      if (chat.client !== client) return; // an earlier connection of this tab
      chat.connection = { state, transport: info.transport, detail: info.detail || null };
      chat.states.push([state, info.transport, info.detail || null]);
      if (state === "closed" && !chat.closing && String(info.detail).startsWith("replaced") && chat.retabs < 3) {
        // Another tab has our key: a duplicated tab copies sessionStorage, tab id included.
        chat.retabs += 1;
        registerTab(true).then(connect, (e) => showError("chat-error", e));
        return;
      }
      renderConnection();
      if (state === "open") {
        registerTab(false).catch(() => {}); // e.g. after its node's mailboxes were lost
        resyncAll();
      }
    },
  });
  chat.client = client;
  client.on("gap", resyncAll);
  client.connect();
}

// -- views --------------------------------------------------------------------------

function showLogin() {
  $("chat-view").hidden = true;
  $("whoami").hidden = true;
  $("login-view").hidden = false;
  const notice = sessionStorage.getItem("cherrychat.notice");
  sessionStorage.removeItem("cherrychat.notice");
  if (notice) showError("login-error", notice);
  $("nick").focus();
}

async function startChat(me) {
  chat.me = me;
  await registerTab(false);
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
  $("whoami").hidden = false;
  $("me").textContent = me.nick;
  for (const name of me.rooms) room(name).joined = true; // joined on an earlier visit
  renderConnection();
  connect();
  await Promise.all([refreshRooms(), ...me.rooms.map(catchUp)]);
  // The room this tab had open before a reload (none, if it had none); a new tab opens
  // the first joined room.
  const saved = sessionStorage.getItem("cherrychat.room");
  const start = saved === null ? me.rooms[0] : me.rooms.find((name) => name === saved);
  if (start) await openRoom(start);
  else renderRoom();
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError("login-error", null);
  try {
    await startChat(await api("POST", "/login", { nick: $("nick").value }));
  } catch (error) {
    showError("login-error", error);
  }
});

$("logout").addEventListener("click", async () => {
  chat.closing = true;
  sessionStorage.removeItem("cherrychat.room");
  if (chat.client) chat.client.close();
  await api("POST", "/logout").catch(() => {});
  location.reload();
});

$("reload").addEventListener("click", () => location.reload());

$("leave").addEventListener("click", () => leaveRoom().catch((e) => showError("chat-error", e)));

$("new-room-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("new-room").value.trim().toLowerCase(); // room names are lower case
  if (!name) { showError("chat-error", "type a room name"); return; }
  try {
    await openRoom(name);
    $("new-room").value = "";
  } catch (error) {
    showError("chat-error", error);
  }
});

// Typing: tell the room at most every 2 s while typing, and once when done.
const typingState = { room: null, sentAt: 0 };
function sendTyping(typing) {
  const name = typing ? chat.current : typingState.room;
  if (!name) return;
  typingState.room = typing ? name : null;
  typingState.sentAt = typing ? Date.now() : 0;
  api("POST", `/rooms/${encodeURIComponent(name)}/typing`, { typing }).catch(() => {});
}

$("text").addEventListener("input", () => {
  if (!chat.current) return;
  if (!$("text").value.trim()) { if (typingState.room) sendTyping(false); return; }
  if (typingState.room !== chat.current || Date.now() - typingState.sentAt > 2000) sendTyping(true);
});

$("send-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("text");
  if (!chat.current || !input.value.trim()) return;
  showError("chat-error", null);
  try {
    addMessage(await api("POST", `/rooms/${encodeURIComponent(chat.current)}/messages`, { text: input.value }));
    input.value = "";
    if (typingState.room) sendTyping(false);
  } catch (error) {
    showError("chat-error", error);
  }
});

// Leaving the page (closing the tab, reloading, navigating away): close the connection
// and say goodbye, so that a closed last tab frees the nickname at once instead of after
// the node's linger. keepalive lets the request outlive the page.
window.addEventListener("pagehide", () => {
  if (!chat.tab) return;
  chat.closing = true;
  if (chat.client) chat.client.close();
  fetch(`/tabs/${encodeURIComponent(chat.tab.tab)}/close`, {
    method: "POST", keepalive: true, credentials: "same-origin",
    headers: { "content-type": "application/json" }, body: JSON.stringify({ page: chat.page }),
  }).catch(() => {});
});
// Read in another tab: fewer unread here.
window.addEventListener("storage", (e) => { if (e.key === readKey()) renderRooms(); });
// Back from the back/forward cache: the connection was closed; start afresh.
window.addEventListener("pageshow", (e) => { if (e.persisted) location.reload(); });

api("GET", "/me").then(startChat, (error) => {
  if (error.status === 401) showLogin();
  else showError("login-error", error);
});
