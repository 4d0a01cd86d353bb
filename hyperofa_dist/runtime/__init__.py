"""Shared runtime, written once for every stage: the stage shell, the DeepSpeed launcher, rank supervisor, configs
and job skeleton, signal and shared-memory hygiene, the Ray session and task runner, device and precision choice,
and the seed mixer."""
