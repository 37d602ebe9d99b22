"""The relay: SMTP ingress, durable queue, delivery, HTTP listener and CLI."""

__version__ = "0.1.0"

__all__ = ["__version__"]
