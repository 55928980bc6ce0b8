"""The integration tests' fixtures (the real stack on the tiny models) live in tests/conftest.py, shared with
tests/browser."""
