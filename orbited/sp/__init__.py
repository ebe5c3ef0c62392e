"""SP (nanomsg/nng scalability protocols): sans-I/O wire cores and Twisted shells."""
