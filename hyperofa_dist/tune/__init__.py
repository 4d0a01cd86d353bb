"""`hyperofa tune hypernet`: choose the hypernetwork's settings on the user's data (Ray Tune, ASHA).

- `space.py`: the seeded trial settings and the choice of the winner (pure).
- `trial.py`: one trial in-process: the pure hypernet loop, predictions, init's new-token loss.
- `stage.py`: the command: checks, Ray Tune on the user's Ray, the trial table, the winning config, MLflow.
"""
