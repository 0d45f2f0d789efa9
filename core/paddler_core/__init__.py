"""Shared wire types of Paddler: desired state, agent protocol, inference messages.

This package does no I/O. The balancer, the agent and the operator all import it;
it imports nothing of theirs.
"""
