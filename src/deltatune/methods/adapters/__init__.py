"""Activation deltas: bottleneck adapters and their fusion."""
