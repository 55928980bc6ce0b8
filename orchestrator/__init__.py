"""Starts, watches and stops vlmserve's services (Triton + gateway)."""
