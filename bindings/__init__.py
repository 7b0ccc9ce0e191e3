"""lmarith.bindings: Python wrappers over the compiled lmarith._C."""
