"""The scheduler's side of nudging requests. Before a step each side declares the answer
tokens its sequences must hold and which positions' logits it needs (the nudger's next draft
token, the base's view at word boundaries, the base's next token); `reserve` makes the
sequences match, rolling KV back where a draft was cut. After the step `advance` draws every
nudging request's tokens in one batched call and moves each round on."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..decoding import DecodeRow, next_tokens
from ..decoding.nudging import (NudgingState, Phase, Probe, Side, Take, Wait, candidates,
                                common_prefix, decide, decode_after)
from ..decoding.nudging.state import Lookahead
from ..decoding.nudging.words import clean_text
from ..kv_cache import BlockManager
from ..sampling_params import SamplingParams
from .request import Request
from .sequence import Sequence

GREEDY = SamplingParams(temperature=0.0, max_tokens=1)
TakePiece = Callable[[Request, list, str], None]
Finish = Callable[..., None]          # Scheduler.finish(request, reason, error=None)


def side_needs(state: NudgingState) -> list[tuple[Side, list[int], list[int]]]:
    """(side, answer ids its sequences must hold, answer lengths whose next-token logits it
    needs) for the sides that run this step (both while a whole draft finishes behind the base)."""
    needs = []
    drafting = state.phase is Phase.DRAFT or state.lookahead is not None
    if drafting and not state.draft.done:
        ids = state.draft_context + state.draft_ids
        needs.append((state.nudger, ids, [len(ids)]))
    if state.phase is Phase.DRAFT and state.pending:
        longest = max(state.pending.values(), key=len)
        needs.append((state.base, longest, sorted(len(ids) for ids in state.pending.values())))
    elif state.phase is Phase.BASE and not (state.lookahead and state.lookahead.base_idle):
        needs.append((state.base, state.base.ids, [len(state.base.ids)]))
    return needs


def reserve(request: Request, block_manager: BlockManager, copy_page) -> None:
    """Give the running sides' sequences their tokens (may raise CacheExhaustedError)."""
    state = request.nudging
    state.needs = {}
    for side, ids, lengths in side_needs(state):
        for slot in side.slots:
            seq = request.sequences[slot]
            first = seq.prompt_len + lengths[0] - 1
            _reconcile(seq, seq.token_ids[: seq.prompt_len] + ids, first, block_manager, copy_page)
            state.needs[slot] = first


def _reconcile(seq: Sequence, ids: list[int], first_needed: int, block_manager: BlockManager,
               copy_page) -> None:
    """Make seq hold ids, recomputing from first_needed at the latest (its logits are wanted)."""
    keep = min(common_prefix(seq.token_ids, ids), first_needed)
    if keep < len(seq.token_ids):
        block_manager.truncate(seq, keep)
    seq.num_computed = min(seq.num_computed, keep)
    new = ids[len(seq.token_ids):]
    if new:
        for source, target in block_manager.ensure_capacity(seq, len(new)):
            copy_page(source, target)
        seq.token_ids.extend(new)


def plan_work(request: Request, budget: int) -> list[tuple[Sequence, int, int]]:
    """(sequence, tokens to compute, logits rows wanted) within budget; no logits (and no
    decision this step) when the work must be chunked."""
    needs = request.nudging.needs
    work = [(request.sequences[slot], request.sequences[slot].num_uncomputed,
             len(request.sequences[slot].token_ids) - first) for slot, first in needs.items()]
    work = [(seq, count, wanted) for seq, count, wanted in work if count > 0]
    if sum(count for _, count, _ in work) <= budget:
        return work
    share = budget // max(1, len(work))
    chunked = [(seq, min(count - wanted, share), 0) for seq, count, wanted in work]
    return [piece for piece in chunked if piece[1] > 0]


def settled_length(request: Request, slot: int) -> int:
    """Tokens of the sequence that no later hand-off can take back (for the prefix cache)."""
    state = request.nudging
    settled = state.base.ids if slot in state.base.slots else state.draft_context
    if state.lookahead is not None and slot in state.base.slots:
        settled = settled[: state.lookahead.base_len]
    return request.sequences[slot].prompt_len + len(settled)


def advance(requests: list[Request], logits: dict[Sequence, torch.Tensor],
            take_piece: TakePiece, finish: Finish) -> None:
    """Draw every ready token of the step's nudging requests in one batched call, then move
    each request's round on (decide, hand off, finish)."""
    jobs = []
    for request in requests:
        if not request.is_finished and _ready(request, logits):
            jobs.extend(_jobs(request, logits))
    results = next_tokens([row for _, _, _, row in jobs]) if jobs else []
    for (request, kind, word, _), result in zip(jobs, results):
        if request.is_finished:
            continue
        if isinstance(result, Exception):
            finish(request, "error", result)
            continue
        _apply(request, kind, word, result, take_piece)
    for request in requests:
        if not request.is_finished and request.nudging.phase is Phase.DRAFT:
            _settle(request, take_piece, finish)
        if not request.is_finished and request.nudging.lookahead and request.nudging.draft.done:
            _resolve(request, take_piece, finish)
        request.metrics.nudging_rounds = request.nudging.rounds


def _ready(request: Request, logits) -> bool:
    """True when every sequence that needed logits got them (no chunked prefill pending)."""
    needs = request.nudging.needs
    return bool(needs) and all(request.sequences[slot] in logits for slot in needs)


def _rows(request: Request, side: Side, length: int, logits) -> list[torch.Tensor]:
    """Each of side's terms' logits for the token after `length` answer tokens."""
    needs = request.nudging.needs
    return [logits[request.sequences[slot]][request.sequences[slot].prompt_len + length - 1 - needs[slot]]
            for slot in side.slots]


def _jobs(request: Request, logits) -> list[tuple]:
    state = request.nudging
    base_params = state.base_params
    jobs = []
    slots = state.needs
    if state.phase is Phase.BASE and state.base.slots[0] in slots:
        rows = _rows(request, state.base, len(state.base.ids), logits)
        jobs.append((request, "base", None, DecodeRow(state.base.formula, state.base.plan, rows,
                                                      base_params, request.seed, state.next_draw())))
    if state.nudger.slots[0] in slots:
        rows = _rows(request, state.nudger, len(state.draft_context) + len(state.draft_ids), logits)
        jobs.append((request, "draft", None, DecodeRow(state.nudger.formula, state.nudger.plan, rows,
                                                       GREEDY, request.seed, 0)))
    for word, ids in state.pending.items() if state.phase is Phase.DRAFT else ():
        rows = _rows(request, state.base, len(ids), logits)
        jobs.append((request, "probe", word, DecodeRow(state.base.formula, state.base.plan, rows,
                                                       base_params, request.seed, state.next_draw())))
    return jobs


def _apply(request: Request, kind: str, word: Optional[int], sampled, take_piece: TakePiece) -> None:
    state = request.nudging
    if kind == "draft":
        state.add_draft_token(sampled.token)
        return
    top_prob = math.exp(sampled.top[0][1])
    if kind == "probe":
        ids = state.pending.pop(word)
        text = None if sampled.token in state.base.end_ids else decode_after(
            state.base.tokenizer, ids + [sampled.token], len(ids))
        state.probes[word] = Probe(sampled.token, text, top_prob)
        return
    if top_prob < state.gamma and state.run_complete:
        if state.lookahead is not None:    # the new round waits for the whole draft
            state.lookahead.base_idle = state.lookahead.round_pending = True
        else:
            state.start_round()            # uncertain: this token is dropped, the nudger writes
        return
    _base_token(request, sampled.token, take_piece)


def _base_token(request: Request, token: int, take_piece: TakePiece) -> None:
    """Append a base token (held back while a whole draft is still being written)."""
    state = request.nudging
    _emit(request, [token], state.add_base_token(token), take_piece, nudged=False)
    look = state.lookahead
    if look is not None and (request.is_end_token(token) or
                             len(request.output_ids) + look.held_tokens >= request.params.max_tokens):
        look.base_idle = True


def _emit(request: Request, ids: list, text: str, take_piece: TakePiece, nudged: bool) -> None:
    """Hand a piece to the request now, or hold it while a lookahead is open."""
    look = request.nudging.lookahead
    if look is not None:
        look.held.append((ids, text, nudged))
        return
    if nudged:
        request.metrics.nudged_tokens += len(ids)
    if ids or text:
        take_piece(request, ids, text)


def _settle(request: Request, take_piece: TakePiece, finish: Finish) -> None:
    """Decide the round as far as the draft and the probes allow. With whole drafts the
    words are judged as they come too; a hand-off before the draft is complete opens a
    lookahead (the base writes, held back, while the nudger finishes its draft)."""
    state = request.nudging
    while True:
        early = state.full_drafts and not state.draft.done
        decision = decide(state.draft, state.probes, state.gamma, state.full_drafts and not early)
        if isinstance(decision, Take):
            _take(request, decision, take_piece, finish, lookahead=early)
            return
        if decision.word is None or _ask(state, decision, one=early):
            return


def _ask(state: NudgingState, wait: Wait, one: bool = False) -> bool:
    """Queue base probes (all of a whole draft's words at once, else the one asked for);
    False when none can be asked (boundaries inside tokens), so decide runs again."""
    if state.full_drafts and not one:
        asked = [(word, cut) for word, cut in candidates(state.draft.text)
                 if word not in state.probes and word not in state.pending]
    else:
        asked = [(wait.word, wait.boundary)]
    for word, cut in asked:
        ids = state.probe_ids(cut)
        if ids is None:
            state.probes[word] = Probe(available=False)
        else:
            state.pending[word] = ids
    longest = max(state.pending.values(), key=len, default=[])
    for word, ids in list(state.pending.items()):
        if longest[: len(ids)] != ids:         # not on the same token path: cannot ask
            del state.pending[word]
            state.probes[word] = Probe(available=False)
    return bool(state.pending)


def _take(request: Request, decision: Take, take_piece: TakePiece, finish: Finish,
          lookahead: bool = False) -> None:
    """Commit the round's words; then the base continues, the answer ends, or a new round."""
    state = request.nudging
    words = clean_text(state.draft.text[: decision.cut])
    if not decision.finish and state.note_words(words):
        finish(request, "stop")                 # the same nudging words three rounds running
        return
    if lookahead:
        state.lookahead = Lookahead(len(state.text), len(state.base.ids))
    held = state.lookahead.held_tokens if state.lookahead else 0
    ids, piece = state.take_draft(decision.cut, request.params.max_tokens - len(request.output_ids) - held)
    _emit(request, ids, piece, take_piece, nudged=True)
    if request.is_finished:
        return
    look = state.lookahead
    if decision.finish:
        finish(request, "stop")
    elif decision.hand_off and decision.probe.token not in state.base.end_ids and not (
            look and len(request.output_ids) + look.held_tokens >= request.params.max_tokens):
        state.phase = Phase.BASE
        _base_token(request, decision.probe.token, take_piece)
    elif look is not None:
        state.phase = Phase.BASE
        look.base_idle, look.round_pending = True, not decision.hand_off or \
            decision.probe.token in state.base.end_ids
    else:
        state.start_round()


def _resolve(request: Request, take_piece: TakePiece, finish: Finish) -> None:
    """The whole draft is written: if it ends the answer, it replaces what the base wrote
    since the hand-off (the paper's rule); else the held pieces go out and the round goes on."""
    state = request.nudging
    look = state.lookahead
    if state.draft.ended:
        state.roll_back()
        ids, piece = state.take_draft(len(clean_text(state.draft.text)),
                                      request.params.max_tokens - len(request.output_ids))
        _emit(request, ids, piece, take_piece, nudged=True)
        if not request.is_finished:
            finish(request, "stop")
        return
    state.lookahead = None
    for ids, text, nudged in look.held:
        if request.is_finished:
            return
        _emit(request, ids, text, take_piece, nudged)
    if request.is_finished:
        return
    if look.round_pending:
        state.start_round()
    elif look.base_idle:
        finish(request, "length")
