"""Helpers for the operations tests: real Prometheus, nginx and ttaserve processes on loopback, and the Grafana
dashboard's queries and rendering."""
