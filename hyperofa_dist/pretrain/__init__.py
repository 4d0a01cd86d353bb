"""Continued MLM pretraining: masking, the masked-positions LM head, the DeepSpeed loop, checkpoints, export."""
