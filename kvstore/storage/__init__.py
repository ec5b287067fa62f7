"""Where compressed contexts live: blob formats, the Redis index and the store over them (no model code)."""
