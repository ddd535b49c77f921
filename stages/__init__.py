"""The pipeline's five DVC stages (download, preprocess, train, evaluate, export) and their library, stages/lib/."""
