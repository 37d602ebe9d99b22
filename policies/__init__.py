"""Sending-policy checks (see the policies issue); empty until then."""
