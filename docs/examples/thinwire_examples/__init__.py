"""The worked examples of docs/extending.md: a compressor, a sync strategy and an optimizer plugin."""
