"""Fault injection for the tests (a proxy that cuts connections and loses replies)."""
