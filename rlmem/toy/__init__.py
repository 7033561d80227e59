"""The toy Countdown reasoner: its word-level tokenizer and the warm-start training that makes it."""
