"""cherrychat: Orbited's classic demo, a multi-room chat on the whole cluster (README.md)."""
