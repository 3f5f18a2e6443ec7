"""Generation, sampling and tokenizers."""
