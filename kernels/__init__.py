"""lmarith.kernels: the kernels' torch and Triton faces. `reference.py` (combine, sample) and
`reference_attention.py` (store-KV, paged attention) are the plain-torch specifications and
the CPU path; `combine.py`, `sample.py`, `store_kv.py` and `paged_attention.py` are the Triton
kernels for CUDA; `attention_metadata.py` describes one step's paged-attention inputs. Callers
go through lmarith.bindings.ops, which checks inputs and picks a face; kernels know nothing
of the engine."""
