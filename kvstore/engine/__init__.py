"""Running the model: loading, chunked prefill, the registered attention function and its observers."""
