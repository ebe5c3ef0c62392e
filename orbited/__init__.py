"""Orbited: a Comet (server push) node and its tools."""

__version__ = "0.1.0.dev0"
