"""The draw on vocabulary shards (decoding/vocab_shards.py) with one rank is exactly
reference.sample(reference.combine(...)): same tokens on random plans (groups, masks, zero
norms), greedy and seeded rows, top-k and min-p, odd vocabularies, -inf entries. The 2-rank
equality is tested end to end in tests/engine/test_tensor_parallel.py."""
from __future__ import annotations

import math

import pytest
import torch

from lmarith.decoding.vocab_shards import ShardRow, draw, log_softmax
from lmarith.distributed import Communicator, VocabRange, vocab_ranges
from lmarith.formula import Plan, stack_plans
from lmarith.kernels import reference

STEPS = [-1.0, -0.5, 0.25, 0.5, 1.0, 1.5]


def random_plan(num_terms: int, gen: torch.Generator) -> Plan:
    groups = int(torch.randint(0, 3, (1,), generator=gen))
    pick = lambda: STEPS[int(torch.randint(len(STEPS), (1,), generator=gen))]  # noqa: E731
    weights = tuple(tuple(pick() for _ in range(num_terms)) for _ in range(1 + 2 * groups))
    masked = bool(torch.rand(1, generator=gen) < 0.4)
    return Plan(terms=tuple(range(num_terms)), weights=weights, consts=(0.0,) * (1 + 2 * groups),
                group_coefs=tuple(pick() for _ in range(groups)),
                group_kinds=tuple(1 if torch.rand(1, generator=gen) < 0.5 else -1 for _ in range(groups)),
                mask_weights=(1.0,) + (0.0,) * (num_terms - 1) if masked else (),
                mask_log_alpha=math.log(0.1) if masked else float("-inf"))


def reference_tokens(logits: torch.Tensor, rows: list[ShardRow]) -> list[int]:
    log_probs, _ = reference.combine(logits, *stack_plans([row.plan for row in rows]))
    column = lambda name, dtype: torch.tensor([getattr(r, name) for r in rows], dtype=dtype)  # noqa: E731
    return reference.sample(log_probs, column("temperature", torch.float32), column("top_k", torch.int32),
                            torch.ones(len(rows)), column("min_p", torch.float32),
                            column("seed", torch.int64), column("step", torch.int64)).tolist()


@pytest.mark.parametrize("vocab_size", [1, 111, 4099])
@pytest.mark.parametrize("batch", [1, 7])
def test_one_rank_draw_equals_reference(vocab_size, batch):
    gen = torch.Generator().manual_seed(vocab_size * 31 + batch)
    num_terms = 3
    logits = torch.randn(num_terms, batch, vocab_size, generator=gen) * 3
    logits[torch.rand(logits.shape, generator=gen) < 0.05] = float("-inf")
    rows = []
    for index in range(batch):
        temperature = [0.0, 0.7, 1.0, 1.3][index % 4]
        rows.append(ShardRow([], random_plan(num_terms, gen), temperature,
                             top_k=[0, 5, 1, 0][index % 4], min_p=[0.0, 0.0, 0.2, 0.05][index % 4],
                             seed=1000 + index, step=index * 3))
    comm = Communicator(0, 1)
    assert draw(logits, rows, VocabRange(0, vocab_size), comm) == reference_tokens(logits, rows)


def test_log_softmax_on_one_rank_is_torchs():
    logits = torch.randn(2, 5, 37)
    logits[0, 1] = float("-inf")          # a term forbidding every token
    expected = torch.log_softmax(logits, dim=-1)
    got = log_softmax(logits, Communicator(0, 1))
    assert torch.allclose(got[:, [0, 2, 3, 4]], expected[:, [0, 2, 3, 4]], atol=1e-6)
    assert torch.isnan(got[0, 1]).all() == torch.isnan(expected[0, 1]).all()


@pytest.mark.parametrize("vocab_size,world", [(10, 3), (49152, 2), (7, 4), (2, 4)])
def test_vocab_ranges_cover_the_vocabulary_once(vocab_size, world):
    ranges = vocab_ranges(vocab_size, world)
    assert len(ranges) == world and ranges[0].start == 0 and ranges[-1].end == vocab_size
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
    assert max(r.size for r in ranges) == -(-vocab_size // world)
