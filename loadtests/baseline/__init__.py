"""One-request-at-a-time baseline server (the old services' way of serving), for comparison with vlmserve only."""
