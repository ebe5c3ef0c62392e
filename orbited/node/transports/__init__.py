"""Browser transports: each moves frames from the hub to one kind of browser connection."""
