"""Face parametrisation for the ops tests: a test module names its op (OP = "combine"), and
every test taking a `face` argument runs once per face of that op in this build
(ops.faces(op)), on the device that face runs on.

Tests build inputs on CPU, hand them to `run_face` (which moves them to the face's device,
calls ops.run(OP, face, ...) and brings the result back) and compare with the torch
reference on CPU. Two markers narrow a test's faces, by deselecting (never skipping):
`@pytest.mark.faces("triton", ...)` keeps only those faces, and `@pytest.mark.compiled_faces`
drops faces that run interpreted (Triton without a GPU: ~25 ms per program), for shapes
too large for the interpreter. A face this build lacks gets no parameter at all.

`paged_batch` builds a paged KV cache for the store_kv and paged_attention tests: the caches
are strided views into one NaN-poisoned byte arena, so any read outside a sequence's causal
range, or any write outside the given slots, shows up as NaN or a changed byte.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lmarith.bindings import ops
from lmarith.kernels.attention_metadata import AttentionMetadata
from lmarith.kernels.quant_formats import QuantWeight

HERE = Path(__file__).parent
CPU = torch.device("cpu")


def face_device(face: str) -> torch.device:
    """Where a face runs: Triton on the GPU when there is one (else interpreted on CPU
    tensors); the torch and C++ faces on the CPU."""
    if face == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return CPU


def is_interpreted(face: str) -> bool:
    """True for a face that runs in the (slow) Triton interpreter here."""
    return face == "triton" and not torch.cuda.is_available()


def to_device(value, device: torch.device):
    """Tensors, tuples/lists of them, QuantWeight and AttentionMetadata moved to device (others
    as is)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    if isinstance(value, QuantWeight):
        return dataclasses.replace(value, data=value.data.to(device))
    if isinstance(value, AttentionMetadata):
        fields = {f.name: to_device(getattr(value, f.name), device)
                  for f in dataclasses.fields(value) if f.name != "scratch"}
        return dataclasses.replace(value, **fields, scratch={})
    return value


def pytest_configure(config: pytest.Config) -> None:
    """Register the two markers that narrow a test's faces."""
    config.addinivalue_line("markers", "faces(*names): run the test only for these faces")
    config.addinivalue_line("markers", "compiled_faces: drop faces run by the Triton interpreter")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One `face` parameter per face of the module's OP that this build has."""
    if "face" in metafunc.fixturenames:
        metafunc.parametrize("face", ops.faces(metafunc.module.OP))


def _wanted(item: pytest.Item) -> bool:
    """False for a face-parametrised item its markers exclude (or with no face at all)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or "face" not in callspec.params:
        return "face" not in getattr(item, "fixturenames", ())
    face = callspec.params["face"]
    if not isinstance(face, str):  # an empty parameter set: no face of the op exists
        return False
    only = item.get_closest_marker("faces")
    if only is not None and face not in only.args:
        return False
    return not (item.get_closest_marker("compiled_faces") and is_interpreted(face))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the face items of tests/ops that the markers exclude."""
    kept, dropped = [], []
    for item in items:
        ours = HERE in Path(item.path).parents
        (kept if not ours or _wanted(item) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def device(face: str) -> torch.device:
    """The device the face under test runs on."""
    return face_device(face)


@pytest.fixture
def interpreted(face: str) -> bool:
    """Whether the face under test runs in the Triton interpreter (keep its shapes small)."""
    return is_interpreted(face)


@pytest.fixture
def run_face(request: pytest.FixtureRequest, face: str, device: torch.device):
    """call(*args, **kwargs): ops.run(OP, face, ...) on the inputs moved to the face's
    device; the result comes back on the CPU."""
    op = request.module.OP

    def call(*args, **kwargs):
        result = ops.run(op, face, *to_device(args, device), **kwargs)
        return to_device(result, CPU)
    return call


PAGE_SIZE = 4
KV_HEADS = 2
CONTEXT_LENS = (1, 5, 13)  # cache tokens per sequence after the step: one page to four
QUERY_LENS = (1, 1, 3)     # new tokens: decode, decode, a 3-token chunk
SPARE_PAGES = 3
PAGE_GAP = 8               # NaN elements between one page's value rows and the next key page


@dataclasses.dataclass
class Batch:
    """A filled paged cache plus the new tokens' queries/keys/values and metadata."""

    arena: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    query: torch.Tensor
    new_keys: torch.Tensor
    new_values: torch.Tensor
    meta: AttentionMetadata

    def on(self, device: torch.device) -> "Batch":
        """The batch on device, its caches still strided views into (the moved) arena."""
        arena = self.arena.to(device)
        elems = arena.view(self.key_cache.dtype)
        caches = [elems.as_strided(cache.shape, cache.stride(), cache.storage_offset())
                  for cache in (self.key_cache, self.value_cache)]
        return Batch(arena, *caches, *to_device((self.query, self.new_keys, self.new_values,
                                                 self.meta), device))


def arena_caches(num_pages: int, head_dim: int, dtype: torch.dtype):
    """NaN-filled byte arena and non-contiguous key/value cache views into it."""
    page_elems = PAGE_SIZE * KV_HEADS * head_dim
    page_stride = 2 * page_elems + PAGE_GAP
    itemsize = torch.empty((), dtype=dtype).element_size()
    arena = torch.zeros(num_pages * page_stride * itemsize, dtype=torch.uint8)
    elems = arena.view(dtype)
    elems.fill_(float("nan"))
    shape = (num_pages, PAGE_SIZE, KV_HEADS, head_dim)
    strides = (page_stride, KV_HEADS * head_dim, head_dim, 1)
    return arena, elems.as_strided(shape, strides, 0), elems.as_strided(shape, strides, page_elems)


def page_layout(generator: torch.Generator):
    """Scrambled page ids per sequence and a zero-padded block table."""
    pages_needed = [math.ceil(n / PAGE_SIZE) for n in CONTEXT_LENS]
    num_pages = sum(pages_needed) + SPARE_PAGES
    order = torch.randperm(num_pages, generator=generator).tolist()
    table = torch.zeros(len(CONTEXT_LENS), max(pages_needed) + 1, dtype=torch.int64)
    for seq, count in enumerate(pages_needed):
        table[seq, :count] = torch.tensor(order[:count])
        order = order[count:]
    return num_pages, table


def slots(block_tables: torch.Tensor, seq: int, positions: torch.Tensor):
    """(page ids, offsets) of the given cache positions of one sequence."""
    return block_tables[seq, positions // PAGE_SIZE], positions % PAGE_SIZE


def make_batch(ratio: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> Batch:
    """Old context written directly into the cache; the new tokens not yet stored. ratio is
    query heads per kv head."""
    generator = torch.Generator().manual_seed(seed)
    num_pages, table = page_layout(generator)
    arena, key_cache, value_cache = arena_caches(num_pages, head_dim, dtype)
    for seq, (ctx, q_len) in enumerate(zip(CONTEXT_LENS, QUERY_LENS)):
        pages, offsets = slots(table, seq, torch.arange(ctx - q_len))
        shape = (len(pages), KV_HEADS, head_dim)
        key_cache[pages, offsets] = torch.randn(shape, generator=generator).to(dtype)
        value_cache[pages, offsets] = torch.randn(shape, generator=generator).to(dtype)
    new_slots = [slots(table, seq, torch.arange(ctx - q_len, ctx))
                 for seq, (ctx, q_len) in enumerate(zip(CONTEXT_LENS, QUERY_LENS))]
    new_pages, new_offsets = zip(*new_slots)
    qkv = torch.randn(sum(QUERY_LENS), KV_HEADS, 2, head_dim, generator=generator).to(dtype)
    query = torch.randn(sum(QUERY_LENS), KV_HEADS * ratio, head_dim, generator=generator).to(dtype)
    meta = AttentionMetadata(
        query_start=torch.tensor([0, *torch.tensor(QUERY_LENS).cumsum(0).tolist()]),
        context_lens=torch.tensor(CONTEXT_LENS), block_tables=table,
        slot_pages=torch.cat(new_pages), slot_offsets=torch.cat(new_offsets), page_size=PAGE_SIZE,
        max_query_len=max(QUERY_LENS), max_context_len=max(CONTEXT_LENS))
    return Batch(arena, key_cache, value_cache, query, qkv[:, :, 0], qkv[:, :, 1], meta)


@pytest.fixture
def paged_batch():
    """make_batch(ratio, head_dim, dtype, seed=0) -> Batch, built on the CPU."""
    return make_batch
