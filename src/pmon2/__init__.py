"""pmon2: a process manager for Linux servers."""

__version__ = "0.1.0"
