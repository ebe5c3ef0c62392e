"""Web-app side: find a key's node by hashing and send it events (docs/client-python.md).

from orbited.client import BlockingClient, Cluster, Node
"""

from orbited.client.blocking import BlockingClient
from orbited.client.cluster import Cluster, HaloDCluster, Node
from orbited.core.tokens import issue_token

__all__ = ["BlockingClient", "Cluster", "HaloDCluster", "Node", "issue_token"]
