"""Planning a run: the pyvene configs, left-padded batches, and rows grouped by target under a token budget."""
