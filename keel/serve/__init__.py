"""`keel serve`: an OpenAI-compatible HTTP server with dynamic and continuous batching (see server.py)."""
