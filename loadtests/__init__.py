"""Load tests (Locust), the one-request-at-a-time baseline servers and ``vlmserve bench`` (see loadtests/README.md).
The top of the stack beside the CLI: it may import everything below it."""
