"""One LLM shared by threads and asyncio tasks: every caller gets exactly the tokens it gets
alone, and callers that arrive together are batched into the same forward passes."""
from __future__ import annotations

import asyncio
import threading
import time

import lmarith as la
from builders import assert_all_pages_free

PROMPTS = ["The cat sat on", "Tell me about dragons and magic.", "Paris", "Once upon a time there was"]
GREEDY = la.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = la.SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=11, ignore_eos=True)


def _formulas(directory):
    model = la.Model(str(directory))
    return [model, model.prompt("You are helpful.") - 0.5 * model.prompt("You are rude."),
            model + la.Union(model.prompt("Magic."), model.prompt("Cats."))]


def _hold_engine(llm: la.LLM) -> threading.Event:
    """Park the engine thread until the returned event is set (commands queue meanwhile).
    Returns only once the loop is inside the parking command: before that it may still be
    draining the queue, and would take later commands with it, out of the queue's count."""
    gate, parked = threading.Event(), threading.Event()

    def hold() -> None:
        parked.set()
        gate.wait()
    llm._loop.call(hold)
    assert parked.wait(30), "the engine loop never ran the parking command"
    return gate


def _wait_for_commands(llm: la.LLM, count: int) -> None:
    deadline = time.monotonic() + 30
    while llm._loop._commands.qsize() < count:
        assert time.monotonic() < deadline, "callers never reached the engine"
        time.sleep(0.005)


def test_two_threads_get_the_tokens_they_get_one_after_the_other(llama_dir):
    formulas = _formulas(llama_dir)
    llm = la.LLM(kv_cache_bytes=4 << 20)
    jobs = [(PROMPTS[0], formulas[1], GREEDY), (PROMPTS[1], formulas[2], SEEDED)]
    alone = [llm.generate([p], f, params)[0].token_ids for p, f, params in jobs]
    calls_alone = sum(llm.stats().forward_calls.values())
    results: dict[int, list[int]] = {}

    def caller(index: int) -> None:
        prompt, formula, params = jobs[index]
        results[index] = llm.generate([prompt], formula, params)[0].token_ids

    gate = _hold_engine(llm)
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    _wait_for_commands(llm, 2)
    gate.set()
    for thread in threads:
        thread.join(60)
    assert [results[0], results[1]] == alone
    calls_together = sum(llm.stats().forward_calls.values()) - calls_alone
    assert calls_together == calls_alone // 2, "both callers should share every forward pass"
    assert_all_pages_free(llm)


def test_many_threads_mixing_generate_and_stream(llama_dir):
    formulas = _formulas(llama_dir)
    llm = la.LLM(kv_cache_bytes=4 << 20, max_num_seqs=8)
    jobs = [(PROMPTS[i % 4], formulas[i % 3], GREEDY if i % 2 else SEEDED) for i in range(8)]
    alone = [llm.generate([p], f, params)[0] for p, f, params in jobs]
    results: dict[int, tuple[str, list[int]]] = {}
    errors: list[BaseException] = []

    def caller(index: int) -> None:
        prompt, formula, params = jobs[index]
        try:
            if index % 2:
                chunks = list(llm.stream(prompt, formula, params))
                results[index] = ("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids])
            else:
                output = llm.generate([prompt], formula, params)[0]
                results[index] = (output.text, output.token_ids)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert [results[i] for i in range(len(jobs))] == [(o.text, o.token_ids) for o in alone]
    assert_all_pages_free(llm)


def test_asyncio_callers_are_batched_and_exact(llama_dir):
    formulas = _formulas(llama_dir)
    llm = la.LLM(kv_cache_bytes=4 << 20)
    alone = [llm.generate([PROMPTS[i]], formulas[i % 3], GREEDY)[0].token_ids for i in range(3)]

    async def main():
        generated = asyncio.gather(*(llm.agenerate([PROMPTS[i]], formulas[i % 3], GREEDY) for i in range(2)))
        streamed = [chunk async for chunk in llm.astream(PROMPTS[2], formulas[2], GREEDY)]
        return await generated, streamed

    generated, streamed = asyncio.run(main())
    assert [g[0].token_ids for g in generated] == alone[:2]
    assert [t for c in streamed for t in c.token_ids] == alone[2]
    assert streamed[-1].finish_reason == "length"
    assert_all_pages_free(llm)


def test_cancelled_async_stream_frees_its_pages(llama_dir):
    llm = la.LLM(kv_cache_bytes=4 << 20)
    model = la.Model(str(llama_dir))
    long = la.SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        async def consume():
            async for _ in llm.astream(PROMPTS[0], model, long):
                await asyncio.sleep(0.01)
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
    assert_all_pages_free(llm)
    assert llm.stats().tokens_generated < 200
