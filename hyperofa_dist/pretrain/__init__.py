"""Continued pretraining: data, optimizer groups, the DeepSpeed loop, checkpoints, export (the objectives are in
`models/`)."""
