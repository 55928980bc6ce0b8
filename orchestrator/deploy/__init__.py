"""Deployments beyond one machine: Kubernetes manifests and Docker Swarm stacks (see docs/scale-out.md)."""
