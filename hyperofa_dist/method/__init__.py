"""Method cores used by more than one stage: the assembly of F_t and its random rows (init, tune), the step-0
held-out measure (init, tune), and the hypernetwork's networks, loss, data, loop, prediction and settings
(`hypernet/`: the hypernet job, tune and the benchmarks). No module here imports a stage."""
