"""Evaluation of expanded models and comparison of runs.

`retrieval` (SR-T, SR-B), `tagging` (zero-shot POS and NER), `mlm` (per-language held-out loss) are pure cores
over files, stock HF models and arrays; `stage` is the `hyperofa evaluate` command that runs the selected tasks and
logs them; `compare` reads MLflow runs and writes the table and the Figure-2-style plots.
"""
