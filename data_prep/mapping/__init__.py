"""The mapping stage: `postings` (token -> word lists as CSR, chunked over Ray), `joined_encoding` (many short
texts through one tokenizer call), `split` (train/val/test of covered source tokens) and `stage` (the shell)."""
