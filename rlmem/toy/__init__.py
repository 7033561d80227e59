"""The toy Countdown reasoner's word-level tokenizer (its warm-start trainer is scripts/train_toy_reasoner.py)."""
