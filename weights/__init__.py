"""Shipped weight files (installed from the top-level weights/ folder)."""
