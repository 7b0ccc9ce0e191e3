"""lmarith.bindings: the checked, dispatched faces of every kernel (ops.py), the input checks
they share (checks.py) and the Python side of the C++ extension lmarith._C (cpp.py)."""
from lmarith.bindings.ops import (combine, combine_cpp, cpp_available, face_for, faces,
                                  paged_attention, run, sample, sample_cpp, store_kv)

__all__ = ["combine", "combine_cpp", "cpp_available", "face_for", "faces", "paged_attention", "run",
           "sample", "sample_cpp", "store_kv"]
