"""The thin Ray layer: the scoring job (Ray Data), verification (ray.data.llm), the distillation trainer (Ray Train) and the pipeline that runs them in order."""
