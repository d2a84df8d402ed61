"""The embedded synthetic task (word problems with a known confounder) and its tiny models; only the CLI's bench commands and the pipeline's prepare stage use it."""
