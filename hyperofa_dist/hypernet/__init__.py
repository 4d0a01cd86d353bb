"""The hypernetwork stage: a set of word vectors -> a token's coordinates in the factorised embedding space.

models (BiLSTM, SetFormer), loss (InfoNCE + normalised L1), data (CSR postings, seeded augmentation, disjoint
length-grouped batches per rank), loop (one epoch / one evaluation, driver-agnostic), train (the DeepSpeed job),
predict (new-token coordinates, test metrics), launch (the deepspeed launcher), stage (`hyperofa hypernet`),
bench (`hyperofa bench hypernet`).
"""
