"""Starts, watches and stops vlmserve's services (Triton + gateway): as processes or Docker containers, with
hardware detection, the GPU memory plan and image builds. Never imports the gateway, the benchmarks or
the CLI."""
