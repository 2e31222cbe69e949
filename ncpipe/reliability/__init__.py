"""Reliability: archive verification, cross-device checks."""
