"""The init stage: new-token coordinates (copy, HyperOFA or OFA prediction, random, mean) and the expanded HF model.

Pure cores here: `methods` (the init methods as a table: name -> the rows it predicts), `ofa` (chunked top-k
neighbour combination), `mean` (source-piece means), `rows` (row statistics). The assembly, random rows and the
step-0 held-out loss (`method/`), the expanded model, its head and factorised form (`models/`) are shared with
`tune`. `stage` is the thin shell that reads the run directory, logs to MLflow and writes `<run_dir>/init/<method>/`.
"""
