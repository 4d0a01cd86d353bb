"""`hyperofa bench <name>`: each benchmark prints one JSON line with its figure and the baseline measured in the
same run (prepare, mapping, hypernet, init, pretrain). Benchmarks drive the stages' own code; the stages carry no
benchmark code."""
