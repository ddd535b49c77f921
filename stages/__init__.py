"""The pipeline's stages (download, preprocess, train, evaluate, export, predict) and their shared modules."""
