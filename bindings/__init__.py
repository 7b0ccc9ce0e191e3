"""lmarith.bindings: Python wrappers over the compiled lmarith._C (see ops.py)."""
from lmarith.bindings.ops import combine, combine_cpp, cpp_available, sample, sample_cpp

__all__ = ["combine", "sample", "combine_cpp", "sample_cpp", "cpp_available"]
