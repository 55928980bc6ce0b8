"""Load tests, the baseline server and the benchmark (see loadtests/README.md)."""
