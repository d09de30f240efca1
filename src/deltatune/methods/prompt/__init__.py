"""Model-level deltas: virtual tokens before the inputs or in every attention layer (engine/prompt.py)."""
