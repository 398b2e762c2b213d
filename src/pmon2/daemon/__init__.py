"""pmond: the daemon that owns every service's state."""
