"""The two Ray preparation stages: `prepare` (corpus -> sampled, tokenized, packed webdataset shards) and
`mapping` (word vectors + tokenizers -> copy pairs, factorisation, token -> word postings, split)."""
