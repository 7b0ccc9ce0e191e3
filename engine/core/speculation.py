"""The scheduler's side of speculative requests: which terms run this step (a term with
factor k once k tokens are pending, all of them when the request must settle), which logits
rows they return, n-gram proposals before the step, and after it the verification: accepted
tokens close, a rejection rolls every term's KV back, verified tokens reach the request."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..decoding import DecodeRow, next_tokens
from ..decoding.speculative import SpeculationState, VerifyRow, propose_ngram, verify
from ..kv_cache import BlockManager
from .request import Request
from .sequence import Sequence

TakeToken = Callable[[Request, Union[int, BaseException]], None]


def must_settle(request: Request) -> bool:
    """True when nothing more may be drawn before every pending token is verified: the
    length budget is reached, or the last pending token would end the request."""
    state = request.spec_state
    if not state.tokens:
        return False
    if len(request.output_ids) + len(state.tokens) >= request.params.max_tokens:
        return True
    return request.is_end_token(state.tokens[-1])


def due_counts(request: Request) -> list[int]:
    """Tokens each term computes this step (0 for a term waiting for k pending tokens)."""
    settle = must_settle(request)
    counts = []
    for seq, factor in zip(request.sequences, request.spec_state.factors):
        pending = seq.num_uncomputed
        counts.append(pending if pending >= factor or (settle and pending) else 0)
    return counts


def logits_wanted(request: Request, seq: Sequence, count: int) -> int:
    """Rows of logits a term's forward returns: those predicting unverified positions."""
    last = seq.num_computed + count - seq.prompt_len        # output position it predicts last
    return max(0, min(count, last - len(request.output_ids) + 1))


def propose(request: Request) -> None:
    """Before a step: the n-gram drafter appends its proposals once all tokens are verified."""
    plan, state = request.speculation, request.spec_state
    if plan.ngram is None or state.tokens or not request.output_ids:
        return
    room = request.params.max_tokens - len(request.output_ids) - 1
    first = request.sequences[0]
    context = first.token_ids[: first.prompt_len] + request.output_ids
    for token in propose_ngram(context, plan.ngram.n, plan.ngram.min_n, min(plan.k, room)):
        state.push(token, None, (False,) * state.num_terms)


def store_logits(request: Request, work: list[tuple[Sequence, int, int]],
                 logits: dict[Sequence, torch.Tensor]) -> None:
    """File each term's returned rows under the open positions they predict."""
    state = request.spec_state
    for seq, count, wanted in work:
        if not wanted:
            continue
        slot = request.sequences.index(seq)
        last = seq.num_computed - seq.prompt_len - len(request.output_ids)
        for offset, row in enumerate(logits[seq]):
            state.put_logits(last - wanted + 1 + offset, slot, row)


@dataclass
class Turn:
    """One request's work in this step's verification: its row, the first open position the
    row checks, and the positions whose computed terms grew (the ones really verified)."""

    request: Request
    row: VerifyRow
    start: int
    grown: list[int]


def _turn(request: Request) -> Optional[Turn]:
    """This step's verification (or plain draw) for one request, if it has one."""
    plan, state = request.speculation, request.spec_state
    grown = [i for i in range(len(state.tokens)) if state.present(i) != state.levels[i]]
    start, stop = (grown[0], grown[-1] + 1) if grown else (len(state.tokens), len(state.tokens))
    frontier = len(state.tokens)     # drawn whenever its always-computed terms are there
    has_bonus = (frontier < len(state.logits) and not must_settle(request)
                 and all(have or not base for have, base in zip(state.present(frontier), plan.base)))
    if start == stop and not has_bonus:
        return None
    positions = list(range(start, stop)) + ([frontier] if has_bonus else [])
    row = VerifyRow([plan.law(state.present(i)) for i in positions],
                    [state.logits[i] for i in positions], state.tokens[start:stop],
                    state.laws[start:stop], has_bonus, request.params, request.seed,
                    state.next_random_step())
    return Turn(request, row, start, grown)


def settle(requests: list[Request], block_manager: BlockManager,
           take_token: TakeToken) -> tuple[int, int]:
    """Verify and draw for every speculative request of the step, then close verified tokens.
    Returns the step's (proposed, accepted) token counts."""
    by_vocab: dict[int, list[Turn]] = {}
    for request in requests:
        turn = _turn(request)
        if turn is not None:
            vocab = next(iter(turn.row.term_logits[0].values())).shape[-1]
            by_vocab.setdefault(vocab, []).append(turn)
    proposed = accepted = 0
    for group in by_vocab.values():
        group = _draw_plain(group, take_token)
        if not group:
            continue
        for turn, result in zip(group, _verify_isolated([turn.row for turn in group])):
            if isinstance(result, Exception):
                take_token(turn.request, result)     # fails this request alone
                continue
            checked, taken = _apply(turn, result, block_manager)
            proposed, accepted = proposed + checked, accepted + taken
    for request in requests:
        while not request.is_finished:
            token = request.spec_state.pop_verified()
            if token is None:
                break
            take_token(request, token)
    return proposed, accepted


def _draw_plain(group: list[Turn], take_token: TakeToken) -> list[Turn]:
    """Draws with nothing to verify at a position every term computed go through the fused
    sampler (no filtered law is needed: the token is verified at once); returns the rest."""
    plain, rest = [], []
    for turn in group:
        state = turn.request.spec_state
        full = not turn.row.proposals and turn.row.has_bonus and all(state.present(len(state.tokens)))
        (plain if full else rest).append(turn)
    if plain:
        rows = [DecodeRow(turn.row.laws[0].formula, turn.row.laws[0].plan,
                          [turn.row.term_logits[0][slot] for slot in turn.row.laws[0].slots],
                          turn.row.params, turn.row.seed, turn.row.step,
                          turn.request.classifier and turn.request.classifier.at(turn.request.drawn_ids))
                for turn in plain]
        for turn, token in zip(plain, next_tokens(rows)):
            state = turn.request.spec_state
            if isinstance(token, Exception):
                take_token(turn.request, token)
            else:
                state.push(token.token, None, (True,) * state.num_terms)
    return rest


def _verify_isolated(rows: list[VerifyRow]) -> list:
    """verify over the batch; when it raises, row by row, so only the culprits fail."""
    try:
        return verify(rows)
    except Exception:
        results = []
        for row in rows:
            try:
                results.append(verify([row])[0])
            except Exception as error:  # reported to this request's caller only
                results.append(error)
        return results


def _apply(turn: Turn, result, block_manager: BlockManager) -> tuple[int, int]:
    """Record a verification: new laws, and either a resampled token (roll back) or a bonus.
    Returns (tokens checked, tokens accepted) for the metrics."""
    request, row, start = turn.request, turn.row, turn.start
    state: SpeculationState = request.spec_state
    taken = sum(1 for i in turn.grown if i < start + result.num_accepted)
    metrics = request.metrics
    metrics.proposed_tokens += len(turn.grown)
    metrics.accepted_tokens += taken
    state.factors = request.speculation.step_factors(metrics.accepted_tokens, metrics.proposed_tokens)
    for offset in range(result.num_accepted):
        state.laws[start + offset] = result.new_laws[offset]
        state.levels[start + offset] = state.present(start + offset)
    if result.num_accepted < len(row.proposals):
        rejected = start + result.num_accepted
        state.replace_from(rejected, result.next_token, result.new_laws[result.num_accepted])
        keep = len(request.output_ids) + rejected
        for seq in request.sequences:
            if len(seq.token_ids) > seq.prompt_len + keep:
                block_manager.truncate(seq, seq.prompt_len + keep)
                seq.num_computed = min(seq.num_computed, seq.prompt_len + keep)
    elif result.next_token is not None:
        frontier = len(state.tokens)
        state.push(result.next_token, result.new_laws[-1], state.present(frontier))
    return len(turn.grown), taken
