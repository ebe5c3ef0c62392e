"""cherrychat's web app (klein): login, rooms, messages, tokens and the presence webhook.

Owns the HTTP API the page uses and every push to browsers. The flow of a message:
page → ``POST /rooms/<room>/messages`` → stored in SQLite (it gets its id) → one
``TwistedClient.send`` to the connection keys of every member of the room, which the
client groups per route and sends through HaloD's route ports → each member's node →
each member's page. The page de-duplicates by id and, whenever its connection comes back,
asks ``GET /rooms/<room>/messages?after=<id>`` for anything it missed (a node crash loses
that node's mailboxes; the app's own history does not).

Identity: the session cookie is a random id the app stored at login; the nickname always
comes from that, never from the request. Browsers get Orbited tokens only from ``/tabs``
and ``/token``, for their own keys.

Users: a nickname's identity (``rules.identity``, case-folded) is the user, so "Alice"
and "alice" are one; the nickname is shown as typed at the latest login.

Tabs: each tab of a user has its own connection key ``(identity, session tag,
"/cherrychat/<tab id>")`` (one key per tab: a node lets one connection hold a key, so two
tabs sharing one would replace each other). Pushes go to every open tab of each
recipient (cherrychat/store.py says when a tab counts as open and a user as online).
"""

from __future__ import annotations

import hmac
import json
from collections import Counter
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
from orbited.core.keys import ConnectionKey
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
        reactor: IReactorTime, halod_status: str = "",
    ) -> None:  # fmt: skip
        """``client`` sends events: an ``orbited.client.twisted.TwistedClient`` (or a fake
        with the same ``send(keys, data)`` returning a Deferred of {key: result})."""
        self.store = store
        self.secret = secret
        self.cluster = cluster
        self.client = client
        self.reactor = reactor
        self.halod_status = halod_status.rstrip("/")
        self.pushes: Counter[str] = Counter()  # result statuses, for /healthz
        self.client_js = client_source().encode()
        self.index = (STATIC / "index.html").read_bytes()
        self._sweeper: task.LoopingCall | None = None
        self._later: set[Any] = set()  # delayed member-list pushes (IDelayedCall)

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        if self.halod_status:
            self._sweeper = task.LoopingCall(self.sweep_failed_nodes)
            self._sweeper.clock = self.reactor
            self._sweeper.start(2.0, now=False)

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

    def push(self, room: str, data: dict[str, Any], also: Iterable[str] = ()) -> defer.Deferred:
        """Send ``data`` to every open tab of every member of ``room`` (and ``also``):
        one event, grouped per route by the client. Never fails: results are counted and
        problems logged."""
        users = list(dict.fromkeys([*self.store.member_idents(room), *also]))
        return self.push_tabs(self.store.tabs_of(users), data, room)

    def push_tabs(self, tabs: list[Tab], data: dict[str, Any], room: str = "") -> defer.Deferred:
        if not tabs:
            return defer.succeed({})
        d = self.client.send([key_of(t) for t in tabs], data)
        d.addCallback(self._pushed, room, data.get("type"))
        d.addErrback(lambda f: self.log.failure("push to {room} failed", f, room=room))
        return d

    def _pushed(self, results: dict[ConnectionKey, dict], room: str, kind: object) -> dict:
        for key, result in results.items():
            status = result.get("status", "?")
            self.pushes[status] += 1
            if status in ("error", "moved"):
                # The page catches up from history when it reconnects; nothing is lost.
                self.log.warn("push {kind} to {room}: {user} {status} {result}", kind=kind,
                              room=room, user=key.user, status=status, result=result)  # fmt: skip
        return results

    def push_members(self, rooms: Iterable[str]) -> None:
        for room in rooms:
            self.push(room, {"type": "members", "room": room, "members": self.store.members(room)})

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
            self.push_tabs(tabs, {"type": "logged_out"})
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
        return {"nick": session.nick, "rooms": self.store.rooms_of(session.ident)}

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
            "orbited": self.cluster.browser_base(key),
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
            self.push(room, {"type": "message", **message})
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
            self.push(room, {"type": "message", **message})
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
        self.push(room, {"type": "message", **message})
        request.setResponseCode(201)
        return self._json(request, message)

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

    def _presence_changed(self, users: set[str]) -> None:
        rooms = sorted({room for ident in users for room in self.store.rooms_of(ident)})
        self.push_members(rooms)

    @defer.inlineCallbacks
    def sweep_failed_nodes(self):  # noqa: ANN201
        """Users of a node that died never get a signoff. Once HaloD has failed the node
        over (it is no longer in HaloD's node list) they count as offline, unless they
        have already signed on elsewhere (the spare that took their route)."""
        try:
            response = yield Agent(self.reactor).request(  # type: ignore[arg-type]
                b"GET", f"{self.halod_status}/status".encode()
            )
            status = json.loads((yield readBody(response)))
        except Exception as e:  # HaloD down or restarting: try again next time
            self.log.debug("HaloD status unavailable: {e}", e=e)
            return
        known = {n["name"] for n in status.get("nodes", [])}
        gone = self.store.nodes() - known
        if gone:
            self.log.info("nodes {gone} left HaloD: their users are offline", gone=sorted(gone))
            self._presence_changed(self.store.drop_nodes(gone))
