"""kvstored: the KV-block storage daemon."""
__version__ = "0.1.0"
