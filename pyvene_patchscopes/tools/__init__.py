"""Developer tools: the survey of every causal-LM family of the installed transformers."""
