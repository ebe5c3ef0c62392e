"""The 2007 Orbit 1.0 protocol (web app → node), so old pyorbited apps keep working.

Sans-I/O parser plus a thin Twisted listener (off by default). Both spellings are
accepted (docs/legacy.md):

    Orbit 1.0            Orbit/1.0
    Event                Action: Event
    id: 7                Id: 7
    recipient: alice, 0, /chat        Recipient: (michael, 123, /event)
    length: 16           Length: 16
    <blank line><length bytes of body>

Each request becomes one event request to the hub; the reply is the original format,
``Success`` + id, or ``Failure`` + id, msg and the recipients that could not be reached.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from orbited.core.keys import WILDCARD, ConnectionKey, KeyError_
from orbited.node import events
from orbited.node.events import MAX_EVENT_ID, DispatchResult, RequestLimits, Status, loads_strict
from orbited.node.hub import Hub
from orbited.node.rep import TCPTransport

MAX_HEADER_BYTES = 64 * 1024
# A header ends at its first blank line: CRLF line ends as the 2007 clients send, or bare
# LF ones (netcat, a here-document), which would otherwise wait for bytes never coming.
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class OrbitError(Exception):
    def __init__(self, message: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.event_id = event_id


@dataclass(frozen=True)
class OrbitRequest:
    event_id: str
    recipients: tuple[ConnectionKey, ...]
    body: bytes


def parse_recipient(value: str, event_id: str | None = None) -> ConnectionKey:
    value = value.strip()
    if value.startswith("(") and value.endswith(")"):
        value = value[1:-1]
    parts = [p.strip() for p in value.split(",", 2)]
    if len(parts) != 3:
        raise OrbitError(f"recipient must be 'user, session, location': {value[:40]!r}", event_id)
    if WILDCARD in parts:  # no browser's key holds it; Orbit 1.0 addresses keys, not users
        raise OrbitError(f'bad recipient: "{WILDCARD}" is reserved in a key part', event_id)
    try:
        return ConnectionKey.from_json(parts)
    except KeyError_ as e:
        raise OrbitError(f"bad recipient: {e}", event_id) from None


class OrbitParser:
    """Bytes in, complete requests out; OrbitError on malformed input (fatal: the
    connection's framing is lost)."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self._buffer = bytearray()
        self._pending: tuple[str, tuple[ConnectionKey, ...], int] | None = None
        self.complete: list[OrbitRequest] = []

    @property
    def buffered(self) -> int:
        """Bytes held: at most MAX_HEADER_BYTES of a header or max_payload of a body."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[OrbitRequest]:
        """Complete requests; on OrbitError those before the bad one are in ``complete``
        and nothing stays buffered (the framing is lost)."""
        try:
            return self._feed(data)
        except OrbitError:
            self._buffer.clear()
            self._pending = None
            raise

    def _feed(self, data: bytes) -> list[OrbitRequest]:
        self._buffer += data
        out = self.complete = []
        while True:
            if self._pending is None:
                found = _HEAD_END.search(self._buffer, 0, MAX_HEADER_BYTES + 4)
                if found is None:
                    if len(self._buffer) > MAX_HEADER_BYTES:
                        raise OrbitError("request header too long")
                    return out
                head = bytes(self._buffer[: found.start()])
                del self._buffer[: found.end()]
                self._pending = self._parse_head(head)
            event_id, recipients, length = self._pending
            if len(self._buffer) < length:
                return out
            body = bytes(self._buffer[:length])
            del self._buffer[:length]
            self._pending = None
            out.append(OrbitRequest(event_id, recipients, body))

    def _parse_head(self, head: bytes) -> tuple[str, tuple[ConnectionKey, ...], int]:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:  # (the id, if it is readable, is still echoed)
            raise OrbitError("request header is not UTF-8", _id_of(head)) from None
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        if lines[0].strip() not in ("Orbit 1.0", "Orbit/1.0"):
            raise OrbitError(f"expected 'Orbit 1.0', got {lines[0][:40]!r}")
        # Every line is read before any is judged, so a refusal echoes the id wherever
        # it stands; a field given twice is refused (a second length would misframe the
        # connection's next request).
        action = None
        fields: dict[str, str] = {}
        raw_recipients: list[str] = []
        for line in lines[1:]:
            if ":" not in line:
                action = line.strip()
                continue
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "recipient":
                raw_recipients.append(value)
            elif name in ("action", "id", "length"):
                if name in fields:
                    raise OrbitError(f"{name} given twice", fields.get("id"))
                fields[name] = value
        event_id = fields.get("id")
        action = fields.get("action", action)
        raw_length = fields.get("length")
        length = None
        if raw_length is not None:
            if not (raw_length.isascii() and raw_length.isdigit() and len(raw_length) <= 9):
                raise OrbitError(f"length must be a number: {raw_length[:20]!r}", event_id)
            length = int(raw_length)
        recipients = [parse_recipient(value, event_id) for value in raw_recipients]
        if action is None:
            raise OrbitError("missing action (Event)", event_id)
        if action.lower() != "event":
            raise OrbitError(f"unsupported action {action[:40]!r}", event_id)
        if not event_id:
            raise OrbitError("missing id")
        if length is None:
            raise OrbitError("missing length", event_id)
        if length > self.limits.max_payload:
            raise OrbitError(f"length over {self.limits.max_payload}", event_id)
        if not recipients:
            raise OrbitError("no recipient", event_id)
        if len(recipients) > self.limits.max_recipients:
            raise OrbitError(f"more than {self.limits.max_recipients} recipients", event_id)
        return event_id, tuple(recipients), length


def _id_of(head: bytes) -> str | None:
    """The id line of a header that is not UTF-8 as a whole, if that line is."""
    for line in head.split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"id":
            try:
                return value.strip().decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def _clean(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def success(event_id: str) -> bytes:
    return f"Success\r\nid: {_clean(event_id)}\r\n\r\n".encode()


# Statuses a `Success` stands for: the event is in every recipient's mailbox.
STORED = frozenset(status for status in Status if status.stored)


def failure(event_id: str | None, message: str, recipients: Sequence[ConnectionKey] = ()) -> bytes:
    lines = ["Failure", f"id: {_clean(event_id or '')}", f"msg: {_clean(message)}"]
    lines += [f"recipient: ({_clean(k.user)}, {_clean(k.session)}, {_clean(k.location)})"
              for k in recipients]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def body_to_data(body: bytes) -> object:
    """pyorbited JSON-encoded bodies by default: JSON stays JSON; anything else is text,
    including what Python's json would take but is not JSON: NaN, Infinity, 1e999 and
    lone surrogates (docs/legacy.md)."""
    text = body.decode("utf-8", "replace")
    try:
        return loads_strict(text)
    except (ValueError, RecursionError):
        return text


@implementer(IPushProducer, IHalfCloseableProtocol)
class OrbitProtocol(Protocol):
    log = Logger()
    transport: TCPTransport  # type: ignore[assignment]  # set by makeConnection (TCP)
    _serials = itertools.count(1)

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.parser = OrbitParser(hub.config.requests)
        # Orbit ids are only unique per connection: scope them so dedup never merges
        # two connections' events. The node's epoch too: the scoped id is the event
        # frames' id, and a page drops an id it already delivered (docs/protocol.md,
        # "Frames"), so another node process must never hand out the same one.
        self.scope = f"orbit.{hub.epoch}.{next(self._serials)}"
        # Replies go out in request order; one may wait (a route being handed over).
        self._replies: deque[list[bytes | None]] = deque()
        self._close_when_flushed = False

    def connectionMade(self) -> None:  # noqa: N802
        # A web app that does not read its replies makes us stop reading its requests.
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:  # noqa: N802
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.transport.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        pass

    # IHalfCloseableProtocol: without it Twisted closes the socket as soon as reading sees
    # the FIN, and a client that sends its request and half-closes lost its reply.
    def readConnectionLost(self) -> None:  # noqa: N802
        """The client sent FIN: answer the requests it sent in full (a partial one is
        dropped), then close."""
        self._close_when_flushed = True
        self._flush()

    def writeConnectionLost(self) -> None:  # noqa: N802
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._close_when_flushed:
            return  # after a Failure for bad input: its framing is lost, read nothing more
        try:
            requests = self.parser.feed(data)
        except OrbitError as e:
            error: OrbitError | None = e
            requests = self.parser.complete  # the good requests before the bad one
        else:
            error = None
        for request in requests:
            try:
                reply = self._dispatch(request)
            except Exception:
                self.log.failure("Orbit request {id} failed", id=request.event_id)
                reply = failure(request.event_id, "the node failed")
            self._reply(reply)
        if error is not None:
            self._reply(failure(error.event_id, error.message))
            self._close_when_flushed = True
            self._flush()

    def _reply(self, reply: bytes | defer.Deferred[bytes]) -> None:
        if isinstance(reply, bytes) and not self._replies:
            self.transport.write(reply)
            return
        cell: list[bytes | None] = [reply if isinstance(reply, bytes) else None]
        self._replies.append(cell)
        if isinstance(reply, defer.Deferred):

            def ready(answer: bytes) -> None:
                cell[0] = answer
                self._flush()

            reply.addCallback(ready)

    def _flush(self) -> None:
        replies = self._replies
        while replies and (ready := replies[0][0]) is not None:
            replies.popleft()
            self.transport.write(ready)
        if self._close_when_flushed and not self._replies:
            self.transport.loseConnection()

    def _dispatch(self, request: OrbitRequest) -> bytes | defer.Deferred[bytes]:
        """The request as an EventRequest to the hub; its per-recipient statuses make the
        Orbit reply (no JSON in between)."""
        try:
            event = events.event_request(
                self._scoped_id(request.event_id), request.recipients,
                body_to_data(request.body), self.hub.config.requests,
            )  # fmt: skip
        except events.RequestError as e:
            self.hub.stats["bad_requests"] += 1
            return failure(request.event_id, e.message)
        outcome = self.hub.dispatch(event)
        if isinstance(outcome, defer.Deferred):
            return outcome.addCallbacks(
                lambda done: self._orbit_reply(request, done),
                lambda f: self._node_failed(request, f),
            )
        return self._orbit_reply(request, outcome)

    def _node_failed(self, request: OrbitRequest, reason: Failure) -> bytes:
        self.log.failure("Orbit request {id} failed", reason, id=request.event_id)
        return failure(request.event_id, "the node failed")

    def _scoped_id(self, event_id: str) -> str:
        scoped = f"{self.scope}:{event_id}"
        if len(scoped) <= MAX_EVENT_ID:
            return scoped
        # A digest, not a cut: two long ids with a common prefix stay two events (cut,
        # the second was answered as a resend of the first and not delivered).
        digest = hashlib.blake2b(event_id.encode(), digest_size=16).hexdigest()
        return f"{self.scope}:#{digest}"

    def _orbit_reply(self, request: OrbitRequest, outcome: DispatchResult) -> bytes:
        # Every recipient the event did not reach or stay for: no connection, its route
        # moved to another node, or the node's mailboxes full (docs/legacy.md, "Replies").
        missing = [k for k, r in zip(request.recipients, outcome.results, strict=True)
                   if not r.status.stored]  # fmt: skip
        if missing:
            return failure(request.event_id, "Failed to reach one or more recipients", missing)
        return success(request.event_id)


class OrbitFactory(Factory):
    noisy = False

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def buildProtocol(self, addr: object) -> OrbitProtocol:  # noqa: N802
        return OrbitProtocol(self.hub)
