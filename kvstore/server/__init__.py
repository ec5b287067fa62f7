"""The HTTP server: an OpenAI-compatible API over stored contexts (a tool on top of the client)."""
