"""twistd plugin: ``twistd halod [halod run flags]`` runs HaloD.

A Twisted dropin (no __init__.py in twisted/plugins/): installed into Twisted's own
twisted/plugins/ by a wheel, found on the source tree's path by an editable install.
"""

from orbited.twistd import halod_maker as halod  # noqa: F401
