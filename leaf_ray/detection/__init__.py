"""Stage 1: confounder detection. ``sensitivity`` (gradient math), ``scorer`` (records in,
scored and pruned batches out), ``pruning`` (spans and counterfactuals), ``store`` (the
resumable output folder and the training-set format), ``verification`` (keep rules)."""
