"""`hyperofa compare`: tables and loss/metric-vs-step plots of MLflow runs, one curve per init method."""
