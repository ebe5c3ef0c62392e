"""Compatibility with the 2007-era Orbited protocols."""
