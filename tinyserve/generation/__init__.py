"""The one generation loop: the scheduler (continuous batching), a session (one chat), sampling, the tokenizer."""
