"""Web-app side: find a key's node by hashing and send it events (docs/client-python.md).

from orbited.client import BlockingClient, Cluster, Node, Selector
"""

from orbited.client.blocking import BlockingClient
from orbited.client.cluster import Cluster, HaloDCluster, Node
from orbited.core.keys import ConnectionKey, Selector
from orbited.core.tokens import issue_token

__all__ = [
    "BlockingClient", "Cluster", "ConnectionKey", "HaloDCluster", "Node", "Selector",
    "issue_token",
]  # fmt: skip
