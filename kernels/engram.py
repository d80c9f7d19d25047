"""Engram conditional memory (placeholder: being written)."""
