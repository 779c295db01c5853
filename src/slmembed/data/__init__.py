"""Data loaders: NLI triplets for training, STS sets for evaluation."""
