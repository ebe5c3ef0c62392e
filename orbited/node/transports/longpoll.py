"""XHR long-poll transport (twisted.web): each GET returns a JSON array of frames.

URL: /orbited/poll?token=...&last=<stream>:<seq>&timeout=<seconds>. The request is
held until an event arrives or ``timeout`` passes (then it returns just the hello frame,
which doubles as the keepalive). ``last`` acknowledges everything up to it.
See docs/protocol.md, "Long-poll".
"""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall
from twisted.web import server
from twisted.web.http import Request

from orbited.core.keys import ConnectionKey
from orbited.node import frames
from orbited.node.frames import Frame
from orbited.node.hub import Hub
from orbited.node.transports.common import (
    BrowserRequestError,
    authenticate,
    check_admitted,
    resumes_session,
    single_param,
)
from orbited.node.transports.http import (
    BrowserResource,
    HTTPSink,
    apply_cors,
    decoded_args,
    send_json_error,
)
from orbited.node.transports.limits import BrowserLimits

DEFAULT_TIMEOUT = 25.0
MAX_TIMEOUT = 120.0


class _PendingPoll(HTTPSink):
    """The Sink for one held poll request: frames are batched for one reactor turn."""

    kind = "poll"
    wants_pings = False  # a held poll ends by its own timeout
    is_poll = True

    def __init__(
        self, hub: Hub, key: ConnectionKey, request: Request, limits: BrowserLimits
    ) -> None:
        super().__init__(hub, key, request, limits)
        self.frames: list[bytes] = []
        self.holding = False
        self._timer: IDelayedCall | None = None
        self._flush_call: IDelayedCall | None = None

    def hold(self, timeout: float) -> None:
        if self.finished:  # answered already (a reconnect frame from attach)
            return
        self.holding = True
        self._timer = self.hub.clock.callLater(timeout, self.flush)

    def deliver(self, out: list[Frame]) -> bool:
        if self.finished:
            return False
        self.frames.extend(frame.data for frame in out)
        if self.holding and self._flush_call is None:
            # Batch whatever else arrives in this reactor turn into the same response.
            self._flush_call = self.hub.clock.callLater(0, self.flush)
        return True

    def flush(self) -> None:
        if not self._end():
            return
        self.request.write(b"[" + b",".join(self.frames) + b"]")
        self.request.finish()

    def replaced(self) -> None:
        # A newer poll for the same key: answer this one, telling it to stop polling.
        self.frames.append(frames.REPLACED)
        self.flush()

    def reconnect(self, reason: str, route: int | None = None, spread: float | None = None) -> None:
        if self.finished:
            return
        self.frames.append(frames.reconnect(reason, route, spread))
        self.close_connection()
        self.flush()

    def closed(self, code: int, reason: str) -> None:
        if self.finished:
            return
        if code == frames.USER_LIMIT and not self.frames:  # nothing to answer yet: a 429
            self.refuse()
        else:
            self.frames.append(frames.closed(code, reason))
            self.flush()

    def _stop_timers(self) -> None:
        for call in (self._timer, self._flush_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._flush_call = None


class LongPollResource(BrowserResource):
    def render_OPTIONS(self, request: Request) -> bytes:  # noqa: N802
        return self.preflight(request, b"GET")

    def render_GET(self, request: Request) -> bytes | int:  # noqa: N802
        request.setHeader(b"cache-control", b"no-store")
        try:
            apply_cors(request, self.cors_origins)
            # Before any work: 503 when overloaded; a poll resuming a session (a `last`
            # that parses, a token seen before) takes no connect_rate token.
            self.limits.check(poll=True, new=not resumes_session(self.auth, request.args))
            params = decoded_args(request)
            attach = authenticate(self.auth, params)
            timeout = self._timeout(params)
            check_admitted(self.hub, attach.key)  # 429: the user's connection limit
        except BrowserRequestError as e:
            return send_json_error(request, e)
        request.setHeader(b"content-type", b"application/json")
        poll = _PendingPoll(self.hub, attach.key, request, self.limits)
        self.hub.attach(attach.key, poll, attach.after)
        if len(poll.frames) > 1 or timeout == 0:
            poll.flush()  # more than the hello frame: answer at once
        else:
            poll.hold(timeout)
        return server.NOT_DONE_YET

    @staticmethod
    def _timeout(params: dict[str, list[str]]) -> float:
        text = single_param(params, "timeout")
        if text is None:
            return DEFAULT_TIMEOUT
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= MAX_TIMEOUT:  # also rejects nan
            raise BrowserRequestError(
                400, "bad_timeout", f"timeout must be a number of seconds from 0 to {MAX_TIMEOUT:g}"
            )
        return value
