"""Prompt deltas: model-level ones (virtual tokens before the inputs or in every attention layer, engine/prompt.py)
and LLaMA-Adapter's gated adaption prompts on attention modules (a layer delta)."""
