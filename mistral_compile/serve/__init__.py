"""`mistral-compile serve`: an OpenAI-compatible HTTP server over the batched runtime."""
