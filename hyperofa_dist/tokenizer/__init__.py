"""The tokenizer stage: the target tokenizer, extended from the source one (or trained fresh) on the corpus."""
