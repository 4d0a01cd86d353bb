"""On-disk formats: one module per artifact passed between stages, each owning its file names, its writer and
its validating reader (which turns a missing, truncated or foreign file into one `HyperofaError` line).

    files       atomic writes, hashes, the .npy/.npz writer and reader every format uses
    rundir      stage directories and manifests
    corpus      the user's corpus (three layouts) as units of work
    tokenizer   HF tokenizer directories; the one tokenizer loader (also for Ray workers)
    shards      prepare's webdataset shards and ShardSet, its manifest as the stages read it
    vectors     word-vector files (ColexNet+ .wv, gensim .kv without running pickled code, word2vec, own .npy)
    mapping     the mapping stage's postings, factors, split and word table
    hypernet    the hypernetwork's weights, predictions and test metrics
    jobdir      a DeepSpeed job's job file and checkpoints
    init        the init stage's coordinates, provenance and expanded model
    models      HF model directories
    results     evaluation results
    summary     the pipeline's results table (results/summary.md, .csv)
    comparison  compare's tables and figures
    journal     MLflow writes not yet confirmed by the tracking store (<run.dir>/tracking/)
"""
