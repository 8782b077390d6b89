"""tether: session reliability for any TCP service."""

__version__ = "0.1.0"
