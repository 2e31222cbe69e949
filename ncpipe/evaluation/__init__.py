"""Evaluation: learned and classical codecs, BD-rate, plots."""
