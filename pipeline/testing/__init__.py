"""Test support shipped with maskmint: tiny models of every family built offline, and fault injection."""
