"""Text around the model: chat templates, the incremental detokenizer and the reply parser (no torch)."""
