"""Entropy coding: probability tables, the rANS coder and the deterministic entropy-parameter path."""
