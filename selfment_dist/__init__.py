"""Selfment on Ray."""
