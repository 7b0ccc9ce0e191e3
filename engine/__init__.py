"""lmarith: composed decoding over several language models."""
