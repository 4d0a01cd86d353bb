"""The hypernetwork: models (BiLSTM, SetFormer), loss (InfoNCE + normalised L1), data (CSR postings, seeded
augmentation, disjoint length-grouped batches per rank), loop (one epoch / one evaluation, driver-agnostic), predict
(new-token coordinates, test metrics), settings (the config's hypernet keys as specs, the training split)."""
