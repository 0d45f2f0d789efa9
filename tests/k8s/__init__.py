"""Tests against a real local Kubernetes control plane (scripts/k8s/)."""
