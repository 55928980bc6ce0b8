"""Typed request models shared by gateway and Triton models."""
