"""SP (nanomsg/nng scalability protocols), sans-I/O: the wire framing (wire) and the REQ/REP
backtrace rules (reqrep). The bottom layer: imports nothing else from orbited and no Twisted;
the node's REP server (orbited.node.rep) is the Twisted shell over it."""
