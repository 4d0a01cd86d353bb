"""The vectors stage: cross-lingual word vectors trained from a parallel corpus."""
