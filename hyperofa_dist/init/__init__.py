"""The init stage: new-token coordinates (copy, HyperOFA or OFA prediction, random) and the expanded HF model.

Pure cores: `methods` (the init methods as a table: name -> the rows it predicts), `ofa` (chunked top-k neighbour
combination), `random` (seeded source-statistics rows), `assemble`
(F_t with a provenance per row), `export` (stock HF masked LM of the source family), `factorised` (F_t . P
training variant and its full-rank export). `stage` is the thin shell that reads the run directory, logs to
MLflow and writes `<run_dir>/init/<method>/`.
"""
