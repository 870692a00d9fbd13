"""What both process boundaries share: the KV data path (kvtransfer.protocol)
and the router<->worker control plane (engine.control_protocol) each keep their
messages in one module, and both refuse a bad message with this one error."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message broke its protocol (malformed, oversized, another version, an
    unknown type); the text names the field and what was expected."""
