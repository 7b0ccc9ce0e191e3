"""Ways in from outside Python: `cli` (the `lmarith` command and `python -m lmarith`). The
OpenAI-compatible HTTP server and the Ray Serve deployment will live here too."""
