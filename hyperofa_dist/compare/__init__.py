"""`hyperofa compare`: tables and loss/metric-vs-step plots of MLflow runs, one curve per init method (and pipeline).

core.py is the comparison itself (pure: run records in, tables and figure data out); stage.py reads the store,
writes the files and logs them."""
