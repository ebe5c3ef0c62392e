"""cherrychat's web app (klein): login, rooms, messages, tokens and the presence webhook.

Owns the HTTP API the page uses and every push to browsers. The flow of a message:
page → ``POST /rooms/<room>/messages`` → stored in SQLite (it gets its id) → one
``TwistedClient.send`` addressed to every member of the room as a user (``[member, "*",
"*"]``: every tab of theirs), which the client groups per route and sends through HaloD's
route ports → each member's node (hash version 2: all of a user's tabs are on one node) →
each of their tabs. The page de-duplicates by id and, whenever its connection comes back,
asks ``GET /rooms/<room>/messages?after=<id>`` for anything it missed (a node crash loses
that node's mailboxes; the app's own history does not).

Latest-value events (docs/protocol.md): member lists go with ``latest="members:<room>"``
and typing states with ``latest="typing:<room>:<user>"``, so a slow or reconnecting tab
gets only the newest of each, not a backlog. With ``offline_hook``, chat messages ask for
the node's offline hook: a member with no tab, or whose tabs have not acknowledged the
message within ``offline_after`` seconds, is reported to ``POST /orbited/offline``; the app
logs "would push" (it has no mobile push) and shows it under the message, and a later
``cancel`` (a tab acknowledged it) too.

Identity: the session cookie is a random id the app stored at login; the nickname always
comes from that, never from the request. Browsers get Orbited tokens only from ``/tabs``
and ``/token``, for their own keys.

Users: a nickname's identity (``rules.identity``, case-folded) is the user, so "Alice"
and "alice" are one; the nickname is shown as typed at the latest login.

Tabs: each tab of a user has its own connection key ``(identity, session tag,
"/cherrychat/<tab id>")`` (one key per tab: a node lets one connection hold a key, so two
tabs sharing one would replace each other), with its own mailbox and resume. Pushes are
addressed to users (or, for a logout, to one session: ``[user, tag, "*"]``), so the node
reaches every tab it has; the app does not list tabs to send (cherrychat/store.py says
when a tab counts as open and a user as online, for the member lists). The nodes may limit
the tabs per user (``user_max_connections``): the page says so when its tab is refused.
"""

from __future__ import annotations

import hmac
import json
from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from cherrychat import rules
from cherrychat.store import NickTaken, Presence, Session, Store, Tab
from orbited.client.cluster import Cluster
from orbited.core.keys import ConnectionKey, Selector
from orbited.core.tokens import issue_token
from orbited.node.presence import SIGNATURE_HEADER, sign
from orbited.node.web import client_source

LOCATION = "/cherrychat"  # every key of this app: (identity, session tag, LOCATION/<tab id>)
COOKIE = b"cherrychat"
TOKEN_TTL = 3600
MAX_BODY = 16 * 1024  # a message is at most 1000 characters; JSON of that fits easily
MAX_WEBHOOK_BODY = 1024 * 1024
STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}
# A tab that says goodbye frees its user's nickname at once, but the member lists hear of
# it this much later, and only if the user is still offline: a reload comes back sooner.
CLOSE_GRACE = 2.0
OFFLINE_AFTER = 10.0  # seconds a message may stay unacknowledged before "would push"
MAX_OFFLINE_LOG = 200  # offline notices kept for /healthz and the tests


def message_event_id(room: str, number: int) -> str:
    """The event id of a room's message: the same on a resend, and the offline hook's
    notices name it, so they map back to the message."""
    return f"m.{room}.{number}"


def message_of(event_id: object) -> tuple[str, int] | None:
    """(room, message id) of a message's event id, or None."""
    if not isinstance(event_id, str):
        return None
    kind, _, rest = event_id.partition(".")
    room, _, number = rest.rpartition(".")
    if kind != "m" or not number.isdigit() or len(number) > 18:
        return None
    try:
        return rules.room(room), int(number)
    except rules.InvalidInput:
        return None


def key_of(tab: Tab) -> ConnectionKey:
    return ConnectionKey(tab.ident, tab.tag, f"{LOCATION}/{tab.tab}")


def tab_of(key: object) -> Tab | None:
    """The tab a webhook's key names, or None if the key is not one of this app's."""
    if not (isinstance(key, list) and len(key) == 3 and all(isinstance(p, str) for p in key)):
        return None
    user, tag, location = key
    folder, _, tab = location.rpartition("/")
    if folder != LOCATION or not rules.is_tab_id(tab):
        return None
    return Tab(user, tag, tab)


class HTTPError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ChatApp:
    app = Klein()
    log = Logger()

    def __init__(
        self, store: Store, secret: bytes, cluster: Cluster, client: Any,
        reactor: IReactorTime, halod_status: str = "", *, offline_hook: bool = False,
        offline_after: float = OFFLINE_AFTER, max_tabs: int = 0,
    ) -> None:  # fmt: skip
        """``client`` sends events: an ``orbited.client.twisted.TwistedClient`` (or a fake
        with the same ``send(recipients, data, event_id, latest=, offline=)`` returning a
        Deferred of {recipient: result}). ``offline_hook``: the nodes post offline notices
        to ``/orbited/offline`` (their ``offline_url``), so messages ask for them.
        ``max_tabs``: the nodes' ``user_max_connections`` (0: no limit), for the page."""
        self.store = store
        self.secret = secret
        self.cluster = cluster
        self.client = client
        self.reactor = reactor
        self.halod_status = halod_status.rstrip("/")
        self.pushes: Counter[str] = Counter()  # result statuses, for /healthz
        self.offline_hook = offline_hook
        self.offline_after = offline_after
        self.max_tabs = max_tabs
        self.offline_log: deque[dict[str, Any]] = deque(maxlen=MAX_OFFLINE_LOG)
        self.offline_counts: Counter[str] = Counter()  # needs_push / cancel, for /healthz
        self.client_js = client_source().encode()
        self.index = (STATIC / "index.html").read_bytes()
        self._sweeper: task.LoopingCall | None = None
        self._later: set[Any] = set()  # delayed member-list pushes (IDelayedCall)

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        if self.halod_status:
            self._sweeper = task.LoopingCall(self.sweep_failed_nodes)
            self._sweeper.clock = self.reactor
            self._sweeper.start(2.0, now=True)

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        for call in self._later:
            if call.active():
                call.cancel()
        self.client.close()

    # -- helpers -----------------------------------------------------------------------

    @app.handle_errors(HTTPError)
    def _http_error(self, request: IRequest, failure: Any) -> bytes:
        error = failure.value
        request.setResponseCode(error.code)
        return self._json(request, {"error": error.message})

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Any) -> bytes:
        """No route for this path (404) or not for this method (405): JSON like the rest."""
        error = failure.value
        request.setResponseCode(error.code or 500)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            request.setHeader(b"allow", ", ".join(sorted(error.valid_methods)).encode())
        message = {404: "no such page", 405: "method not allowed"}.get(error.code or 0)
        return self._json(request, {"error": message or str(error.description)})

    @app.handle_errors(rules.InvalidInput)
    def _invalid(self, request: IRequest, failure: Any) -> bytes:
        request.setResponseCode(400)
        return self._json(request, {"error": str(failure.value)})

    @staticmethod
    def _json(request: IRequest, value: object) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(value).encode()

    @staticmethod
    def _body(request: IRequest) -> dict[str, Any]:
        """The JSON object a page POSTed. Requiring application/json also makes any
        cross-site form post fail (it would need a CORS preflight nobody answers)."""
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type != b"application/json":
            raise HTTPError(415, "send application/json")
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise HTTPError(413, "request body too large")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise HTTPError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return body

    def _session(self, request: IRequest) -> Session:
        sid = request.getCookie(COOKIE)
        session = self.store.session(sid.decode("ascii", "replace") if sid else None)
        if session is None:
            raise HTTPError(401, "log in first")
        return session

    def _member(self, request: IRequest, room: str) -> tuple[Session, str]:
        session = self._session(request)
        room = rules.room(room)
        if not self.store.is_member(room, session.ident):
            raise HTTPError(403, f"join {room} first")
        return session, room

    # -- pushing -----------------------------------------------------------------------

    def push(
        self, room: str, data: dict[str, Any], also: Iterable[str] = (), *,
        event_id: str | None = None, latest: str | None = None, offline: bool = False,
        skip: str | None = None,
    ) -> defer.Deferred:  # fmt: skip
        """Send ``data`` to every tab of every member of ``room`` (and ``also``; not
        ``skip``): one event, one wildcard recipient per user, grouped per route by the
        client. Never fails: results are counted and problems logged."""
        users = [u for u in dict.fromkeys([*self.store.member_idents(room), *also]) if u != skip]
        targets = [Selector(u, None) for u in users]
        return self.send(targets, data, room, event_id=event_id, latest=latest, offline=offline)

    def send(
        self, targets: list[Selector], data: dict[str, Any], room: str = "", *,
        event_id: str | None = None, latest: str | None = None, offline: bool = False,
        tabs: list[Tab] | None = None,
    ) -> defer.Deferred:  # fmt: skip
        """``tabs``: the targets' tabs if the store no longer has them (a logout)."""
        if self.cluster.hash_version < 2:
            # A cluster still on hash version 1 has no wildcards (a user's tabs may be on
            # several nodes): the open tabs the app knows of, each by its key.
            targets = self._tab_keys(targets, tabs)  # type: ignore[assignment]
        if not targets:
            return defer.succeed({})
        options: dict[str, Any] = {}
        if latest is not None:
            options["latest"] = latest
        if offline and self.offline_hook:
            options["offline"] = self.offline_after
        d = self.client.send(targets, data, event_id, **options)
        d.addCallback(self._pushed, room, data, event_id, options)
        d.addErrback(lambda f: self.log.failure("push to {room} failed", f, room=room))
        return d

    def _tab_keys(self, targets: list[Selector], tabs: list[Tab] | None) -> list[ConnectionKey]:
        if tabs is None:
            tabs = self.store.tabs_of(dict.fromkeys(t.user for t in targets))
        wanted = set(targets)
        return [
            key_of(tab) for tab in tabs
            if Selector(tab.ident, None) in wanted or Selector(tab.ident, tab.tag) in wanted
        ]  # fmt: skip

    def _pushed(
        self, results: dict[Any, dict], room: str, data: dict[str, Any],
        event_id: str | None, options: dict[str, Any],
    ) -> dict | defer.Deferred:  # fmt: skip
        kind = data.get("type")
        if "offline" in options and any(_unhooked(r) for r in results.values()):
            # The nodes have no offline_url: stop asking, and send this one without it.
            self.log.warn("the nodes refuse offline notices ({result}): pushing without them",
                          result=next(r for r in results.values() if _unhooked(r)))  # fmt: skip
            self.offline_hook = False
            options = {k: v for k, v in options.items() if k != "offline"}
            d = self.client.send(list(results), data, event_id, **options)
            d.addCallback(self._pushed, room, data, event_id, options)
            return d
        for target, result in results.items():
            status = result.get("status", "?")
            reached = result.get("keys")
            if status == "matched" and isinstance(reached, dict):
                for one in reached.values():  # each tab reached
                    self.pushes[one.get("status", "?")] += 1
            else:
                self.pushes[status] += 1
            if status in ("error", "moved", "limited"):
                # The page catches up from history when it reconnects; nothing is lost.
                self.log.warn("push {kind} to {room}: {user} {status} {result}", kind=kind,
                              room=room, user=target[0], status=status, result=result)  # fmt: skip
        return results

    def push_members(self, rooms: Iterable[str]) -> None:
        for room in rooms:
            self.push(room, {"type": "members", "room": room, "members": self.store.members(room)},
                      latest=f"members:{room}")  # fmt: skip

    def push_message(self, message: dict[str, Any]) -> defer.Deferred:
        """A stored message to its room's members, with its own event id; with the offline
        hook, members who do not get it on a tab are reported."""
        room = message["room"]
        return self.push(room, {"type": "message", **message}, offline=True,
                         event_id=message_event_id(room, message["id"]))  # fmt: skip

    # -- pages -------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # Defence in depth: even if some text slipped into the DOM as HTML, no inline
        # script or handler would run. Pages may reach only the nodes' route ports.
        host = getattr(self.cluster, "host", "127.0.0.1")
        request.setHeader(
            b"content-security-policy",
            (f"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
             f" connect-src 'self' http://{host}:* ws://{host}:*; frame-src http://{host}:*;"
             " object-src 'none'; base-uri 'none'; form-action 'self'").encode(),
        )  # fmt: skip
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return self.index

    @app.route("/static/<name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        if name not in STATIC_TYPES:
            raise HTTPError(404, "no such file")
        request.setHeader(b"content-type", STATIC_TYPES[name].encode())
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        return (STATIC / name).read_bytes()

    @app.route("/orbited-client.mjs", methods=["GET"])
    def client_module(self, request: IRequest) -> bytes:
        """The JS client from this origin, so the page loads even while a node is down."""
        request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
        return self.client_js

    @app.route("/healthz", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        online = self.store.online()
        return self._json(request, {
            "ok": True, "rooms": len(self.store.rooms()), "online": len(online),
            "tabs": sum(online.values()), "pushes": dict(self.pushes),
            "offline": dict(self.offline_counts),
        })  # fmt: skip

    # -- session -----------------------------------------------------------------------

    @app.route("/login", methods=["POST"])
    def login(self, request: IRequest) -> bytes:
        nick = rules.nickname(self._body(request).get("nick"))
        try:
            sid = self.store.login(nick)
        except NickTaken:
            raise HTTPError(409, "that nickname is in use by someone online") from None
        request.addCookie(COOKIE, sid.encode(), path=b"/", httpOnly=True, sameSite="strict")
        self.log.info("{nick!r} logged in", nick=nick)
        return self._json(request, self._me(self.store.session(sid)))  # type: ignore[arg-type]

    @app.route("/logout", methods=["POST"])
    def logout(self, request: IRequest) -> bytes:
        """End the session at once: the nickname is free, the user offline in every member
        list, and the session's other tabs are told (they show the login)."""
        self._body(request)
        sid = request.getCookie(COOKIE)
        session = self.store.session(sid.decode("ascii", "replace") if sid else None)
        if session is not None:
            was_online = self.store.is_online(session.ident)
            tabs = self.store.logout(sid.decode("ascii", "replace"))
            # Every tab of this session (not another login of the same user).
            self.send([Selector(session.ident, session.tag)], {"type": "logged_out"}, tabs=tabs)
            if was_online:
                self._presence_changed({session.ident})
            self.log.info("{nick!r} logged out", nick=session.nick)
        # Attribute values are strings (Twisted refuses an int Max-Age with a TypeError).
        request.addCookie(COOKIE, b"", path=b"/", max_age=b"0",
                          expires=b"Thu, 01 Jan 1970 00:00:00 GMT", httpOnly=True,
                          sameSite="strict")  # fmt: skip
        return self._json(request, {"ok": True})

    @app.route("/me", methods=["GET"])
    def me(self, request: IRequest) -> bytes:
        return self._json(request, self._me(self._session(request)))

    def _me(self, session: Session) -> dict[str, Any]:
        return {"nick": session.nick, "rooms": self.store.rooms_of(session.ident),
                "max_tabs": self.max_tabs}  # fmt: skip

    # -- tabs --------------------------------------------------------------------------

    @app.route("/tabs", methods=["POST"])
    def open_tab(self, request: IRequest) -> bytes:
        """A page (one load of a tab) starts: from now on its tab gets the user's pushes.
        Answers the tab's key, its route, where to connect and a token for it."""
        body = self._body(request)
        session = self._session(request)
        tab = Tab(session.ident, session.tag, rules.tab_id(body.get("tab")))
        if self.store.open_tab(session, tab.tab, rules.tab_id(body.get("page"), "page id")):
            self._presence_changed({session.ident})
        key = key_of(tab)
        return self._json(request, {
            "tab": tab.tab, "key": key.to_json(), "route": self.cluster.route_of(key),
            "hash": self.cluster.hash_version, "orbited": self.cluster.browser_base(key),
            "token": issue_token(self.secret, key, TOKEN_TTL),
        })  # fmt: skip

    @app.route("/tabs/<tab>/close", methods=["POST"])
    def close_tab(self, request: IRequest, tab: str) -> bytes:
        """The page's goodbye (``pagehide``: closed, reloaded or left). If that was the
        user's last open tab, the nickname is free at once; member lists are told after
        CLOSE_GRACE seconds, by when a reloading page is back."""
        body = self._body(request)
        session = self._session(request)
        page = rules.tab_id(body.get("page"), "page id")
        if self.store.close_tab(session, rules.tab_id(tab), page):
            call = self.reactor.callLater(CLOSE_GRACE, self._still_offline, session.ident)
            self._later.add(call)
        request.setResponseCode(204)
        return b""

    def _still_offline(self, ident: str) -> None:
        self._later = {c for c in self._later if c.active()}
        if not self.store.is_online(ident):
            self._presence_changed({ident})

    @app.route("/routes/<route>", methods=["GET"])
    def route(self, request: IRequest, route: str) -> bytes:
        """Where a route's browsers connect: the page's ``locate`` asks when a node moves
        its key to another route (a ``reconnect`` frame with ``route``, e.g. after
        ``halod rehash``)."""
        self._session(request)
        if not route.isdigit() or not 1 <= int(route) <= self.cluster.routes:
            raise HTTPError(400, f"a route is 1 to {self.cluster.routes}")
        return self._json(request, {"route": int(route),
                                    "orbited": self.cluster.node(int(route)).browser})  # fmt: skip

    @app.route("/token", methods=["GET"])
    def token(self, request: IRequest) -> bytes:
        """A fresh Orbited token for one of the user's tabs (``?tab=<id>``); the JS
        client calls this again when its token expires."""
        session = self._session(request)
        raw = (request.args.get(b"tab") or [b""])[0].decode("utf-8", "replace")
        tab = Tab(session.ident, session.tag, rules.tab_id(raw))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return issue_token(self.secret, key_of(tab), TOKEN_TTL).encode()

    # -- rooms -------------------------------------------------------------------------

    @app.route("/rooms", methods=["GET"])
    def rooms(self, request: IRequest) -> bytes:
        return self._json(request, {"rooms": self.store.rooms(self._session(request).ident)})

    @app.route("/rooms/<room>/join", methods=["POST"])
    def join(self, request: IRequest, room: str) -> bytes:
        self._body(request)
        session = self._session(request)
        room = rules.room(room)
        if self.store.join(room, session.ident):
            message = self.store.add_message(room, session.nick, "joined", kind="join")
            self.push_message(message)
            self.push_members([room])
        return self._json(request, self._room_view(room))

    @app.route("/rooms/<room>/leave", methods=["POST"])
    def leave(self, request: IRequest, room: str) -> bytes:
        self._body(request)
        session = self._session(request)
        room = rules.room(room)
        left = self.store.leave(room, session.ident)
        if left:
            message = self.store.add_message(room, session.nick, "left", kind="leave")
            self.push_message(message)
            self.push_members([room])
        return self._json(request, {"room": room, "left": left})

    @app.route("/rooms/<room>", methods=["GET"])
    def room_view(self, request: IRequest, room: str) -> bytes:
        _, room = self._member(request, room)
        return self._json(request, self._room_view(room))

    def _room_view(self, room: str) -> dict[str, Any]:
        return {"room": room, "members": self.store.members(room),
                "messages": self.store.recent(room)}  # fmt: skip

    @app.route("/rooms/<room>/messages", methods=["GET"])
    def messages(self, request: IRequest, room: str) -> bytes:
        _, room = self._member(request, room)
        raw = (request.args.get(b"after") or [b"0"])[0]
        if not raw.isdigit() or len(raw) > 18:
            raise HTTPError(400, "after must be a message id")
        found = self.store.messages(room, after=int(raw))
        return self._json(request, {"room": room, "messages": found,
                                    "members": self.store.members(room)})  # fmt: skip

    @app.route("/rooms/<room>/messages", methods=["POST"])
    def post(self, request: IRequest, room: str) -> bytes:
        body = self._body(request)
        session, room = self._member(request, room)
        text = rules.message(body.get("text"))
        message = self.store.add_message(room, session.nick, text)
        # Not waited for: the sender's page shows the message from this answer, and a
        # member whose node is down catches up from history when it reconnects.
        self.push_message(message)
        request.setResponseCode(201)
        return self._json(request, message)

    @app.route("/rooms/<room>/typing", methods=["POST"])
    def typing(self, request: IRequest, room: str) -> bytes:
        """The user is (``{"typing": true}``) or stopped (false) typing in ``room``: the
        other members' tabs are told, as a latest-value event per (room, user), so a tab
        that is behind gets only the newest state."""
        body = self._body(request)
        session, room = self._member(request, room)
        state = body.get("typing")
        if not isinstance(state, bool):
            raise HTTPError(400, "typing must be true or false")
        self.push(room, {"type": "typing", "room": room, "nick": session.nick, "typing": state},
                  latest=f"typing:{room}:{session.ident}", skip=session.ident)  # fmt: skip
        request.setResponseCode(204)
        return b""

    # -- presence ----------------------------------------------------------------------

    @app.route("/orbited/presence", methods=["POST"])
    def presence(self, request: IRequest) -> bytes:
        """Signed signon/signoff batches from the nodes (docs/protocol.md)."""
        body = request.content.read(MAX_WEBHOOK_BODY + 1)
        if len(body) > MAX_WEBHOOK_BODY:
            raise HTTPError(413, "request body too large")
        given = (request.getHeader(SIGNATURE_HEADER) or b"").decode("ascii", "replace")
        if not hmac.compare_digest(given, sign(self.secret, body)):
            raise HTTPError(403, "bad signature")
        try:
            batch = json.loads(body)
            node = str(batch["node"])
            events = [(e["type"], e["key"], int(e["serial"])) for e in batch["events"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HTTPError(400, "not a presence batch") from None
        ours = [
            Presence(kind, tab, serial)
            for kind, key, serial in events
            if (tab := tab_of(key)) is not None and kind in ("signon", "signoff")
        ]
        changed = self.store.apply_presence(node, ours)
        self._presence_changed(changed)
        request.setResponseCode(204)
        return b""

    @app.route("/orbited/offline", methods=["POST"])
    def offline(self, request: IRequest) -> bytes:
        """Signed offline notices from the nodes (docs/protocol.md, "Offline webhooks"):
        ``needs_push`` (a member did not get a message on any tab) and ``cancel`` (a tab
        acknowledged it after all). The demo has no mobile push: it logs what it would
        send and tells the room, which shows it under the message."""
        body = request.content.read(MAX_WEBHOOK_BODY + 1)
        if len(body) > MAX_WEBHOOK_BODY:
            raise HTTPError(413, "request body too large")
        given = (request.getHeader(SIGNATURE_HEADER) or b"").decode("ascii", "replace")
        if not hmac.compare_digest(given, sign(self.secret, body)):
            raise HTTPError(403, "bad signature")
        try:
            batch = json.loads(body)
            notices = [(str(e["type"]), e["key"], e["id"], e.get("reason"))
                       for e in batch["events"]]  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HTTPError(400, "not an offline batch") from None
        for kind, key, event_id, reason in notices:
            found = message_of(event_id)
            if kind not in ("needs_push", "cancel") or found is None or not _user_of(key):
                continue
            room, number = found
            ident = key[0]
            nick = self.store.nick_of(ident) or ident
            self.offline_counts[kind] += 1
            entry = {"notice": kind, "room": room, "id": number, "nick": nick, "reason": reason}
            self.offline_log.append(entry)
            if kind == "needs_push":
                self.log.info("📱 would push message {id} of {room} to {nick} ({reason})",
                              id=number, room=room, nick=nick, reason=reason)  # fmt: skip
            else:
                self.log.info("📱 push of message {id} of {room} to {nick} cancelled: read",
                              id=number, room=room, nick=nick)  # fmt: skip
            self.push(room, {"type": "offline", **entry}, latest=f"offline:{room}:{number}:{ident}")
        request.setResponseCode(204)
        return b""

    def _presence_changed(self, users: set[str]) -> None:
        rooms = sorted({room for ident in users for room in self.store.rooms_of(ident)})
        self.push_members(rooms)

    @defer.inlineCallbacks
    def sweep_failed_nodes(self):  # noqa: ANN201
        """Users of a node that died never get a signoff. Once HaloD has failed the node
        over (it is no longer in HaloD's node list) they count as offline, unless they
        have already signed on elsewhere (the spare that took their route). Also follows
        HaloD's hash version (a ``halod rehash``)."""
        try:
            response = yield Agent(self.reactor).request(  # type: ignore[arg-type]
                b"GET", f"{self.halod_status}/status".encode()
            )
            status = json.loads((yield readBody(response)))
        except Exception as e:  # HaloD down or restarting: try again next time
            self.log.debug("HaloD status unavailable: {e}", e=e)
            return
        # HaloD's hash version: the routes pages connect to follow it from the start (the
        # client also follows the nodes' answers, but only once the app sends something).
        if self.cluster.follow_hash(status.get("hash_version")):
            self.log.info("HaloD routes with hash version {v}", v=self.cluster.hash_version)
        known = {n["name"] for n in status.get("nodes", [])}
        gone = self.store.nodes() - known
        if gone:
            self.log.info("nodes {gone} left HaloD: their users are offline", gone=sorted(gone))
            self._presence_changed(self.store.drop_nodes(gone))


def _unhooked(result: dict) -> bool:
    """A node refused the request because it has no offline hook configured."""
    return result.get("code") == "bad_request" and "offline" in str(result.get("error"))


def _user_of(key: object) -> bool:
    """An offline notice's key names a user: ``[user, session or "*", location or "*"]``."""
    return (isinstance(key, list) and len(key) == 3 and all(isinstance(p, str) for p in key)
            and bool(key[0]) and key[0] != "*")  # fmt: skip
