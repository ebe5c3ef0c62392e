"""twistd plugin: ``twistd orbited [orbited node flags]`` runs an Orbited node.

A Twisted dropin (no __init__.py in twisted/plugins/): installed into Twisted's own
twisted/plugins/ by a wheel, found on the source tree's path by an editable install.
"""

from orbited.twistd import node_maker as orbited  # noqa: F401
