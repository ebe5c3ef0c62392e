"""The Twisted helpers both daemons share: running a configured service, logging, the
command dispatcher, twisted.web's JSON-error pieces, and the one module allowed to touch
a private Twisted or autobahn name (twisted_compat)."""
