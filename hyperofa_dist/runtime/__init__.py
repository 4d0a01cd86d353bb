"""Shared runtime, written once for every stage: the stage shell, the DeepSpeed launcher, configs and job
skeleton, the Ray session and task runner, device and precision choice, and the seed mixer."""
