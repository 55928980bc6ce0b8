"""One-request-at-a-time baseline server (the seeds' way of serving), for comparison with vlmserve only."""
