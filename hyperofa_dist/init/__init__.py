"""The init stage: new-token coordinates (copy, HyperOFA or OFA prediction, random, mean) and the expanded HF model.

Pure cores here: `ofa` (chunked top-k neighbour combination), `mean` (source-piece means), `rows` (row statistics).
The assembly and random rows (`method/`), the expanded model, its head and factorised form (`models/`) are shared
with `tune`. `stage` is the thin shell that reads the run directory, logs to MLflow and writes
`<run_dir>/init/<method>/`.
"""
