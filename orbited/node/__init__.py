"""The Orbited node: per-key mailboxes (hub), the web apps' front ends (SP REP, HTTP
publish, Orbit 1.0), the browser transports, and the link to HaloD. Never imports halod
(tests/test_layout.py)."""
