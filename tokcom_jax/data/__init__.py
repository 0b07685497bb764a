"""Text in: corpus sources (the standard library, your files, the hub), tokenizers,
token caches and deterministic batches."""
