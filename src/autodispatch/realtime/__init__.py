"""Realtime delivery: event log reader, router, transports."""
