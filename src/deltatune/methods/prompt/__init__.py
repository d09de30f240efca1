"""Prompt-based deltas."""
