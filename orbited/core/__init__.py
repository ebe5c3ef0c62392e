"""The Twisted-free core both daemons and the web-app clients stand on: connection keys,
hashing and the route-table algorithm, HaloD's typed control messages, settings and
addresses, browser tokens. Nothing here imports Twisted (tests/test_layout.py)."""
