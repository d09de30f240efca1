"""Budget / rank allocation: methods that move rank between layers during training (AdaLoRA, IncreLoRA)."""
