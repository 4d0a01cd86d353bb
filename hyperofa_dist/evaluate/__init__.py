"""Evaluation of expanded models.

`retrieval` (SR-T, SR-B), `tagging` (zero-shot POS and NER), `causal` (bits per byte, fertility) are pure cores
over files, stock HF models and arrays; the per-language held-out MLM loss is the masked objective's
(`models/mlm.py`); `stage` is the `hyperofa evaluate` command that runs the selected tasks and logs them.
"""
