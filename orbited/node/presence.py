"""Presence webhooks: tell the web app when a key comes online and when it is gone for good.

A key *signs on* when the node creates its mailbox (first connection) and *signs off* when
the mailbox expires after the linger time, so a transport reconnect within the linger
time causes no signoff/signon flap. Notices queue in order (bounded) and are POSTed as
signed JSON batches, one request at a time, with retries (orbited.node.webhook); dispatch
never waits for them. See docs/protocol.md, "Presence webhooks".
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from orbited.core.keys import ConnectionKey
from orbited.node.webhook import SIGNATURE_HEADER, WebhookConfig, WebhookQueue, sign

__all__ = ["SIGNATURE_HEADER", "PresenceConfig", "PresenceNotifier", "sign"]


@dataclass(frozen=True)
class PresenceConfig(WebhookConfig):
    """The presence webhook's settings (its own class: the node keys presence_* set it)."""


class PresenceNotifier(WebhookQueue):
    def __init__(
        self, config: PresenceConfig, secret: bytes, node: str, reactor: IReactorTime
    ) -> None:
        super().__init__(config, secret, node, reactor, name="presence")

    def notify(self, kind: str, key: ConnectionKey) -> None:
        """Queue a signon/signoff notice; returns at once."""
        self.push({"type": kind, "key": key.to_json()})
