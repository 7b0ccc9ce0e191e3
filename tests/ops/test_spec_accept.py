"""spec_accept through every face against kernels/reference_speculative.py: identical accepted
counts and tokens for the same (seed, step), whatever the batch; greedy semantics; input
checks. The statistics (the outputs follow the target law) are in test_spec_accept_statistics.py."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lmarith.bindings import ops
from lmarith.kernels import reference, reference_speculative
from lmarith.kernels.sample import _row_key, _uniform
from lmarith.kernels.spec_accept import _stream_key

OP = "spec_accept"
INF = float("inf")
COMPILED = pytest.mark.compiled_faces  # shapes too large for the Triton interpreter

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # interpreter's -inf math
              pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]


def filtered_laws(logits: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """Normalised log-probs with the tokens of cut filtered out (-inf), never the top one."""
    cut = cut.scatter(-1, logits.argmax(dim=-1, keepdim=True), False)
    return torch.log_softmax(logits.masked_fill(cut, -INF), dim=-1)


def draw(gen: torch.Generator, log_probs: torch.Tensor) -> torch.Tensor:
    """One token per law of log_probs [..., V], int64 [...]."""
    flat = log_probs.exp().reshape(-1, log_probs.shape[-1])
    if flat.shape[0] == 0:
        return torch.zeros(log_probs.shape[:-1], dtype=torch.int64)
    return torch.multinomial(flat, 1, generator=gen).reshape(log_probs.shape[:-1])


def nan_padded(x: torch.Tensor) -> torch.Tensor:
    """x as a view into NaN-padded rows: strided positions, and a read past V shows up."""
    padded = torch.full((*x.shape[:-1], x.shape[-1] + 3), float("nan"), dtype=x.dtype)
    padded[..., :x.shape[-1]] = x
    return padded[..., :x.shape[-1]]


def greedy_proposals(tokens, target, num_drafts, greedy) -> None:
    """Greedy row g (counting greedy rows only) proposes all K argmaxes of the target but a
    wrong token at position (g + K) % (K + 1): all accepted (the bonus), none, one, ..."""
    max_drafts = tokens.shape[1]
    best = target[:, :max_drafts].argmax(dim=-1)
    for count, row in enumerate(greedy.nonzero().flatten().tolist()):
        tokens[row], num_drafts[row] = best[row], max_drafts
        wrong = (count + max_drafts) % (max_drafts + 1)
        if wrong < max_drafts:
            tokens[row, wrong] = (best[row, wrong] + 1) % target.shape[-1]


def special_rows(target, draft, tokens, num_drafts, greedy) -> None:
    """Row 2 proposes the target's favourite with draft prob 0 (must be rejected); row 3 has
    an all -inf target at position 0 (rejected, token 0); in row 5 p = q / 2 everywhere (an
    empty residual: the race runs over p). All sample one or more proposals."""
    vocab, max_drafts = target.shape[-1], draft.shape[1]
    if target.shape[0] >= 6:
        target[5, :max_drafts] = draft[5] - torch.log(torch.tensor(2.0))
        greedy[5], num_drafts[5] = False, max_drafts
    favourite = int(target[2, 0].argmax())
    law = draft[2, 0].clone()
    law[favourite] = -INF
    if not torch.isfinite(law).any():
        law[(favourite + 1) % vocab] = 0.0
    draft[2, 0] = torch.log_softmax(law, dim=-1)
    tokens[2, 0] = favourite
    target[3, 0] = -INF
    greedy[2:4] = False
    num_drafts[2:4] = num_drafts[2:4].clamp_min(1)


def spec_inputs(batch: int, max_drafts: int, vocab: int, seed: int,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """(target, draft, draft_tokens, num_drafts, seed, step, greedy): drafts close to the
    targets (long accepted runs), filtered laws, proposals drawn from the draft, every third
    row greedy on tied targets, num_drafts over 0..K, 64-bit seeds and 40-bit steps."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.5, 4.0, batch)[:, None, None]
    logits = spread * torch.randn(batch, max_drafts + 1, vocab, generator=gen)
    greedy = torch.arange(batch) % 3 == 1
    target_logits = logits + 0.3 * torch.randn(logits.shape, generator=gen)
    target_logits[greedy] = target_logits[greedy].round()  # exact ties for the argmax
    cut = torch.rand(logits.shape, generator=gen) < 0.15  # filtered: mostly the same tokens
    target = filtered_laws(target_logits, cut)
    draft = filtered_laws(logits, cut ^ (torch.rand(logits.shape, generator=gen) < 0.05))
    draft = draft[:, :max_drafts]
    tokens = draw(gen, draft)
    num_drafts = torch.randint(0, max_drafts + 1, (batch,), generator=gen)
    num_drafts[0], num_drafts[-1] = max_drafts, 0
    if max_drafts:
        greedy_proposals(tokens, target, num_drafts, greedy)
    if batch >= 4 and max_drafts:
        special_rows(target, draft, tokens, num_drafts, greedy)
    seeds = torch.randint(-2**62, 2**62, (batch,), generator=gen)
    steps = torch.randint(0, 2**40, (batch,), generator=gen)
    return (nan_padded(target.to(dtype)), nan_padded(draft.to(dtype)), tokens, num_drafts,
            seeds, steps, greedy)


def assert_spec_matches(run_face, *args, **knobs) -> tuple[torch.Tensor, torch.Tensor]:
    """The face's (num_accepted int32, next_token int64) are identical to the reference's."""
    got_accepted, got_tokens = run_face(*args, **knobs)
    want_accepted, want_tokens = reference_speculative.spec_accept(*args)
    assert got_accepted.dtype == torch.int32 and got_tokens.dtype == torch.int64
    for name, got, want in (("num_accepted", got_accepted, want_accepted),
                            ("next_token", got_tokens, want_tokens)):
        assert torch.equal(got, want), \
            f"{name} differs in rows {(got != want).nonzero().flatten().tolist()}: {got} vs {want}"
    return got_accepted, got_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,max_drafts,vocab", [
    (9, 3, 37), (5, 1, 2), (4, 0, 11), pytest.param(16, 5, 1000, marks=COMPILED),
    pytest.param(8, 3, 32000, marks=COMPILED)])
def test_spec_accept_matches_reference(run_face, batch, max_drafts, vocab, dtype) -> None:
    """Mixed greedy and sampled rows on odd shapes, two input sets; the special rows behave."""
    for seed in range(2):
        args = spec_inputs(batch, max_drafts, vocab, seed=seed + 10 * vocab, dtype=dtype)
        accepted, tokens = assert_spec_matches(run_face, *args)
        num_drafts = args[3]
        assert (accepted <= num_drafts).all()
        if batch >= 4 and max_drafts:
            assert accepted[2] == 0, "a proposal with draft probability 0 was accepted"
            assert accepted[3] == 0 and tokens[3] == 0, "an all -inf target must give token 0"
            assert (accepted == num_drafts)[num_drafts > 0].any()  # some rows take the bonus


def test_spec_accept_inputs_exercise_every_path() -> None:
    """The exact-match inputs reach greedy and sampled acceptances, rejections and bonuses."""
    args = spec_inputs(9, 3, 37, seed=370)
    accepted, _ = reference_speculative.spec_accept(*args)
    num_drafts, greedy = args[3], args[6]
    for rows in (greedy, ~greedy):
        assert ((accepted > 0) & rows).any(), "no proposal accepted"
        assert ((accepted < num_drafts) & rows).any(), "no proposal rejected"
        assert ((accepted == num_drafts) & (num_drafts > 0) & rows).any(), "no bonus token"


@pytest.mark.faces("triton")
@pytest.mark.parametrize("vocab,block_v", [(37, 16), (1000, 256)])
def test_spec_accept_triton_tiling(run_face, vocab: int, block_v: int) -> None:
    """The running argmax and the race across several vocabulary tiles."""
    assert_spec_matches(run_face, *spec_inputs(7, 3, vocab, seed=vocab), block_v=block_v)


def greedy_case() -> tuple[torch.Tensor, ...]:
    """Seven greedy rows over V = 5, K = 3, with known answers (see test_greedy_semantics)."""
    gen = torch.Generator().manual_seed(5)
    target = torch.log_softmax(torch.randn(7, 4, 5, generator=gen), dim=-1)
    target[2:4, 0] = torch.log_softmax(torch.tensor([0.0, 2.0, 1.0, 2.0, -1.0]), dim=-1)
    target[6, 0] = -INF
    draft = torch.log_softmax(torch.randn(7, 3, 5, generator=gen), dim=-1)
    tokens = target[:, :3].argmax(dim=-1)
    tokens[1, 1] = (tokens[1, 1] + 2) % 5
    tokens[2, 0], tokens[3, 0], tokens[6, 0] = 3, 1, 2
    draft[5, 0, tokens[5, 0]] = -INF
    num_drafts = torch.tensor([3, 3, 2, 1, 0, 2, 1])
    seed, step = torch.arange(7) * 977, torch.full((7,), 3)
    return target, draft, tokens, num_drafts, seed, step, torch.ones(7, dtype=torch.bool)


def test_greedy_semantics(run_face) -> None:
    """Accept while the proposal is the target's argmax (lowest index among ties), whatever
    the draft law; next token: the argmax where it stopped (or the bonus position)."""
    args = greedy_case()
    target = args[0]
    accepted, tokens = assert_spec_matches(run_face, *args)
    assert accepted.tolist() == [3, 1, 0, 1, 0, 2, 0]
    best = target.argmax(dim=-1)
    rows, stops = torch.arange(7), accepted.to(torch.int64)
    assert torch.equal(tokens, best[rows, stops])
    assert tokens[2] == 1 and tokens[6] == 0  # tie -> lowest index; all -inf -> token 0
    reseeded = run_face(*args[:4], args[4] + 12345, args[5] + 7, args[6])
    assert torch.equal(reseeded[0], accepted) and torch.equal(reseeded[1], tokens)


@pytest.mark.parametrize("batch,vocab", [(7, 37), pytest.param(16, 1000, marks=COMPILED)])
def test_rows_are_independent_of_batching(run_face, batch: int, vocab: int) -> None:
    """A row gives the same result alone, inside the batch, and in a permuted batch."""
    args = spec_inputs(batch, 3, vocab, seed=21)
    together = run_face(*args)
    for row in range(batch):
        alone = run_face(*(a[row:row + 1] for a in args))
        assert [int(alone[0]), int(alone[1])] == [int(together[0][row]), int(together[1][row])]
    perm = torch.randperm(batch, generator=torch.Generator().manual_seed(1))
    permuted = run_face(*(a[perm] for a in args))
    assert all(torch.equal(got, want[perm]) for got, want in zip(permuted, together))


def test_same_seed_and_step_reproduce_and_a_new_step_redraws(run_face) -> None:
    """Sampled rows: the same (seed, step) gives the same result; another step or another
    seed changes many rows (the draws are keyed by both)."""
    batch = 16
    target, draft, tokens, num_drafts, seed, step, _ = spec_inputs(batch, 3, 37, seed=33)
    greedy = torch.zeros(batch, dtype=torch.bool)
    first = run_face(target, draft, tokens, num_drafts, seed, step, greedy)
    again = run_face(target, draft, tokens, num_drafts, seed, step, greedy)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for new_seed, new_step in ((seed, step + 1), (seed + 1000, step)):
        other = run_face(target, draft, tokens, num_drafts, new_seed, new_step, greedy)
        changed = (other[0] != first[0]) | (other[1] != first[1])
        assert changed.sum() > batch // 4, f"only {int(changed.sum())} rows changed"



def good_inputs(batch: int = 3, max_drafts: int = 2, vocab: int = 10) -> list[torch.Tensor]:
    """Valid spec_accept arguments, to be spoiled one at a time."""
    return list(spec_inputs(batch, max_drafts, vocab, seed=1))


BAD_INPUTS = [  # (argument index, spoiled value from good_inputs(), message)
    (0, lambda a: a[0][:, 0], r"target_log_probs must be \[B, K\+1, V\]"),
    (0, lambda a: a[0].to(torch.int64), "target_log_probs must be a floating-point"),
    (1, lambda a: a[1][:, :1], r"draft_log_probs must have shape \[3, 2, 10\]"),
    (2, lambda a: a[2][:, :1], r"draft_tokens must have shape \[3, 2\]"),
    (2, lambda a: a[2].float(), "draft_tokens must be an integer"),
    (2, lambda a: torch.full_like(a[2], 10), r"draft_tokens must lie in \[0, 10\)"),
    (2, lambda a: torch.full_like(a[2], -1), r"draft_tokens must lie in \[0, 10\)"),
    (3, lambda a: torch.full_like(a[3], 3), r"num_drafts must lie in \[0, 2\]"),
    (3, lambda a: torch.full_like(a[3], -1), r"num_drafts must lie in \[0, 2\]"),
    (3, lambda a: a[3][:2], r"num_drafts must have shape \[3\]"),
    (4, lambda a: a[4].double(), "seed must be an integer"),
    (6, lambda a: a[6].to(torch.int32), "greedy must be a bool"),
    (5, lambda a: a[5].to("meta"), "all inputs must be on one device"),
]


@pytest.mark.parametrize("index,spoil,message", BAD_INPUTS)
def test_dispatch_rejects_bad_inputs(index: int, spoil, message: str) -> None:
    """ops.spec_accept checks its inputs, with messages that say what to change."""
    args = good_inputs()
    args[index] = spoil(args)
    with pytest.raises(ValueError, match=message):
        ops.spec_accept(*args)


def test_every_face_is_behind_the_checks(face: str, run_face) -> None:
    """ops.run checks before any face runs; good inputs run."""
    args = good_inputs()
    args[3] = torch.full_like(args[3], 3)
    with pytest.raises(ValueError, match="num_drafts must lie in"):
        ops.run(OP, face, *args)
    accepted, _ = run_face(*good_inputs())
    assert (accepted <= good_inputs()[3]).all()


def test_dispatch_picks_the_face_for_the_device() -> None:
    """CUDA -> triton; CPU -> cpp when lmarith._C built, else torch; ops.spec_accept runs
    that face."""
    cpu_face = "cpp" if ops.cpp_available() else "torch"
    assert ops.face_for(OP, torch.device("cpu")) == cpu_face
    assert ops.face_for(OP, torch.device("cuda")) == "triton"
    args = spec_inputs(7, 3, 37, seed=4)
    dispatched = ops.spec_accept(*args)
    wanted = reference_speculative.spec_accept(*args)
    assert torch.equal(dispatched[0], wanted[0]) and torch.equal(dispatched[1], wanted[1])


@triton.jit
def _stream_uniform_kernel(seed_ptr, step_ptr, out_ptr, stream, V, BLOCK_V: tl.constexpr):
    """Row's acceptance uniform of `stream` (column V) and its race uniforms (columns < V)."""
    row = tl.program_id(0)
    stream = tl.zeros([], tl.int32) + stream  # a tensor even where Triton specialises 1
    key = _stream_key(_row_key(tl.load(seed_ptr + row), tl.load(step_ptr + row)), stream)
    cols = tl.arange(0, BLOCK_V)
    tl.store(out_ptr + row * (V + 1) + cols, _uniform(key, cols), mask=cols < V)
    tl.store(out_ptr + row * (V + 1) + V, _uniform(key, tl.zeros([], tl.uint32)))


@pytest.mark.faces("triton")
@pytest.mark.parametrize("stream", [0, 1, 6, 2**31 - 1])
def test_stream_uniforms_are_bit_exact(device: torch.device, stream: int) -> None:
    """The kernel's stream keys reproduce the reference's uniforms bit for bit."""
    seed = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**40) - 7, 0x9E3779B9], dtype=torch.int64)
    step = torch.tensor([0, 5, 2**31 + 3, 7, 2**33 + 1, 123456789], dtype=torch.int64)
    vocab = 64
    out = torch.empty(len(seed), vocab + 1, device=device)
    _stream_uniform_kernel[(len(seed),)](seed.to(device), step.to(device), out, stream, vocab,
                                         BLOCK_V=vocab)
    key = reference_speculative.stream_key(seed, step, stream)
    tokens = torch.arange(vocab, dtype=torch.int64)
    race = reference.uniform_from_hash(reference.mix32(key[:, None] ^ tokens[None, :]))
    assert torch.equal(out[:, :vocab].cpu(), race)
    if stream % 2 == 0:
        assert torch.equal(out[:, vocab].cpu(),
                           reference_speculative.accept_uniform(seed, step, stream // 2))
    else:
        assert torch.equal(out[:, vocab].cpu(), reference.uniform_from_hash(reference.mix32(key)))
