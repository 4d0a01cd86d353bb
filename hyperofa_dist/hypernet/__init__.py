"""The hypernetwork stage: a set of word vectors -> a token's coordinates in the factorised embedding space.

train (the DeepSpeed job), stage (`hyperofa hypernet`). The networks, loss, data, loop, prediction and settings are
in `method/hypernet/`, shared with `tune hypernet` and the benchmarks.
"""
