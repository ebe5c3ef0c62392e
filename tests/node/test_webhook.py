"""WebhookQueue (orbited.node.webhook): order, batching, one request at a time, retries
with backoff, drops, the bound, cancellation and the signature, on a task.Clock with the
HTTP POST replaced by a recorder (the real POST is tested end to end in
test_presence.py and test_user_protocol_offline.py)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from orbited.core.settings import FieldError
from orbited.node.webhook import WebhookConfig, WebhookQueue, sign

SECRET = b"s3cret"


class Receiver:
    """Records each POSTed body; answers from ``answers`` (True = 2xx, False = refused,
    None = never answers) and then True."""

    def __init__(self, *answers: bool | None) -> None:
        self.bodies: list[dict] = []
        self.times: list[float] = []
        self.answers = list(answers)
        self.pending: list[defer.Deferred[bool]] = []
        self.clock: Clock | None = None

    def __call__(self, body: bytes) -> defer.Deferred[bool]:
        self.bodies.append(json.loads(body))
        assert self.clock is not None
        self.times.append(self.clock.seconds())
        answer = self.answers.pop(0) if self.answers else True
        if answer is None:
            d: defer.Deferred[bool] = defer.Deferred()
            self.pending.append(d)
            return d
        return defer.succeed(answer)

    def serials(self) -> list[list[int]]:
        return [[e["serial"] for e in b["events"]] for b in self.bodies]


def make(receiver: Receiver, **config: object) -> tuple[WebhookQueue, Clock]:
    clock = Clock()
    receiver.clock = clock
    cfg = WebhookConfig("http://127.0.0.1:9/hook", **config)  # type: ignore[arg-type]
    queue = WebhookQueue(cfg, SECRET, "node-1", clock, name="test", post=receiver,
                         serials=itertools.count(1))  # (this test's own, from 1)  # fmt: skip
    return queue, clock


def test_the_webhooks_of_one_process_never_share_a_serial():
    """docs/protocol.md: serial increases per node process. Presence and offline notices
    may go to one receiver, which drops a (node, serial) it has seen."""
    presence, offline = Receiver(), Receiver()
    clock = Clock()
    presence.clock = offline.clock = clock
    cfg = WebhookConfig("http://127.0.0.1:9/hook")
    queues = [WebhookQueue(cfg, SECRET, "node-1", clock, name=n, post=r)
              for n, r in (("presence", presence), ("offline", offline))]  # fmt: skip
    for i in range(6):
        queues[i % 2].push({"type": "t"})
        clock.advance(0)
    got = [s for r in (presence, offline) for b in r.serials() for s in b]
    assert len(set(got)) == 6
    assert sorted(presence.serials()) == presence.serials()  # each in order


def test_notices_leave_in_order_in_batches():
    receiver = Receiver()
    queue, clock = make(receiver, batch=2)
    for i in range(5):
        queue.push({"type": "t", "n": i})
    clock.advance(0)
    assert receiver.serials() == [[1, 2], [3, 4], [5]]
    assert [e["n"] for b in receiver.bodies for e in b["events"]] == [0, 1, 2, 3, 4]
    assert all(b["node"] == "node-1" for b in receiver.bodies)
    assert queue.sent == 5 and queue.dropped == 0 and not queue.queue


def test_one_request_at_a_time_and_later_notices_wait_behind_it():
    receiver = Receiver(None)
    queue, clock = make(receiver, batch=10)
    queue.push({"type": "a"})
    clock.advance(0)
    queue.push({"type": "b"})
    queue.push({"type": "c"})
    clock.advance(0)
    assert receiver.serials() == [[1]]  # b and c wait for the first answer
    receiver.pending[0].callback(True)
    clock.advance(0)
    assert receiver.serials() == [[1], [2, 3]]


def test_a_refused_batch_is_retried_with_doubling_backoff():
    receiver = Receiver(False, False, True)
    queue, clock = make(receiver, backoff=0.5, retries=5)
    queue.push({"type": "a"})
    clock.advance(0)
    clock.pump([0.5, 1.0])
    assert receiver.times == [0, 0.5, 1.5]
    assert len({json.dumps(b) for b in receiver.bodies}) == 1  # the same batch each time
    assert queue.sent == 1 and queue.dropped == 0


def test_a_batch_out_of_retries_is_dropped_and_the_next_one_still_goes():
    receiver = Receiver(False, False, False, True)
    queue, clock = make(receiver, backoff=0.5, retries=3, batch=1)
    queue.push({"type": "lost"})
    queue.push({"type": "kept"})
    clock.advance(0)
    clock.pump([0.5, 1.0])
    assert [b["events"][0]["type"] for b in receiver.bodies] == ["lost"] * 3 + ["kept"]
    assert queue.dropped == 1 and queue.sent == 1


def test_a_stalled_post_times_out_and_is_retried():
    receiver = Receiver(None, True)
    queue, clock = make(receiver, timeout=2.0, backoff=0.5)
    queue.push({"type": "a"})
    clock.advance(0)
    clock.advance(2.0)  # the time-out: the attempt failed
    clock.advance(0.5)  # the backoff
    assert len(receiver.bodies) == 2 and queue.sent == 1


def test_queue_is_bounded_and_drops_the_oldest():
    receiver = Receiver()
    queue, clock = make(receiver, max_queue=3)
    for i in range(5):
        queue.push({"type": "t", "n": i})
    assert [n["n"] for n in queue.queue] == [2, 3, 4]
    assert queue.dropped == 2


def test_a_cancelled_notice_is_never_sent_and_frees_its_place():
    receiver = Receiver(None)
    queue, clock = make(receiver, max_queue=2, batch=10)
    queue.push({"type": "first"})
    clock.advance(0)  # in flight: it can no longer be cancelled
    first_in_flight = queue.push({"type": "x"})
    gone = queue.push({"type": "cancelled"})
    assert queue.cancel(gone) and not queue.cancel(gone)
    queue.push({"type": "y"})  # the cancelled one does not count against max_queue
    assert queue.dropped == 0 and queue.waiting == 2
    receiver.pending[0].callback(True)
    clock.advance(0)
    assert [[e["type"] for e in b["events"]] for b in receiver.bodies] == [["first"], ["x", "y"]]
    assert not queue.cancel(first_in_flight)  # sent


def test_a_notice_in_flight_cannot_be_cancelled():
    receiver = Receiver(None)
    queue, clock = make(receiver)
    notice = queue.push({"type": "a"})
    clock.advance(0)
    assert not queue.cancel(notice)
    receiver.pending[0].callback(True)
    assert queue.sent == 1


def test_only_cancelled_notices_left_means_no_post():
    receiver = Receiver()
    queue, clock = make(receiver)
    queue.cancel(queue.push({"type": "a"}))
    clock.advance(0)
    assert receiver.bodies == [] and not queue.queue and queue.waiting == 0
    queue.push({"type": "b"})  # the sender is idle again and takes new notices
    clock.advance(0)
    assert receiver.serials() == [[2]]


def test_signature_is_hex_hmac_sha256_of_the_body():
    body = b'{"node": "n", "events": []}'
    assert sign(SECRET, body) == "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("field", "bad"),
    [("max_queue", 0), ("batch", 0), ("timeout", 0), ("retries", 0), ("backoff", -0.1)],
)
def test_config_fields_out_of_range_are_refused(field, bad):
    with pytest.raises(FieldError):
        WebhookConfig("http://x/", **{field: bad})


def test_no_backoff_retries_at_once():
    receiver = Receiver(False, True)
    queue, clock = make(receiver, backoff=0)
    queue.push({"type": "a"})
    clock.advance(0)
    clock.advance(0)
    assert receiver.times == [0, 0] and queue.sent == 1


def test_an_agent_that_raises_at_once_is_a_failed_attempt_not_a_dead_queue():
    """twisted.web's Agent raises before any request for an https:// URL without TLS
    support: each attempt fails, the batch is dropped and counted, and the queue goes on
    (it used to stop sending for good, losing every later notice uncounted)."""
    clock = Clock()
    cfg = WebhookConfig("http://127.0.0.1:9/hook", backoff=0.5, retries=2, batch=1)
    queue = WebhookQueue(cfg, SECRET, "node-1", clock, name="test")
    attempts: list[bytes] = []

    class RaisingAgent:
        def request(self, method, uri, headers=None, body=None):  # noqa: ANN001, ANN201
            attempts.append(uri)
            raise NotImplementedError("SSL support unavailable")

    queue._agent = RaisingAgent()  # type: ignore[assignment]
    queue.push({"type": "first"})
    queue.push({"type": "second"})
    clock.advance(0)
    clock.pump([0.5] * 6)
    assert len(attempts) == 4  # two attempts for each batch
    assert queue.dropped == 2 and queue.sent == 0
