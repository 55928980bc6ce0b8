"""The chat loop on llama.cpp (vlmserve.model_repository.llamacpp_engine.LlamaCppLoop) on the tiny SmolVLM2, its text
model
converted to a real GGUF by the vendored converter (export/llamacpp.py) and run by the real llama.cpp library.

Every OpenAI feature of the torch loop is checked on this engine too, against the torch loop (the reference the
rest of test_chat_engine.py ties to ``transformers.generate``): the same greedy tokens, the same log probabilities
within float tolerance, rows that join mid-decode unchanged, n choices from one prefill, stop strings, cancellation,
penalties, a JSON-schema row beside free rows, failure isolation. The loop is stepped by hand.

``llama-cpp-python`` is built by ``make llamacpp`` (~6 min, once; CI does it): without it these tests skip
locally and fail in CI.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.unit.test_chat_engine import RECEIPT, make_job
from vlmserve.model_repository.chat_engine import DecodeLoop


def _require_bindings() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed: `make llamacpp` builds it (CI must)")
        pytest.skip("llama-cpp-python is not installed (`make llamacpp` builds it, ~6 min)")


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory):
    """(pipeline, gguf): the tiny SmolVLM2 with its torch vision twin, and its text model as an f32 GGUF."""
    _require_bindings()
    import torch
    from transformers import SmolVLMForConditionalGeneration

    from vlmserve.export import llamacpp
    from vlmserve.export.tiny import build_tiny_smolvlm2
    from vlmserve.model_repository.smolvlm import SmolVLMPipeline, vision_module

    root = tmp_path_factory.mktemp("llamacpp-engine")
    smol_dir = Path(build_tiny_smolvlm2(root / "smolvlm2"))
    vision = vision_module(SmolVLMForConditionalGeneration.from_pretrained(str(smol_dir)).eval())

    def encoder(feeds: dict) -> dict:
        with torch.no_grad():
            out = vision(torch.from_numpy(feeds["pixel_values"]), torch.from_numpy(feeds["patch_attention_mask"]))
        return {"image_features": out.numpy()}

    gguf = llamacpp.ensure_gguf(smol_dir, "f32", lambda _: None, out=root / "gguf")
    return SmolVLMPipeline(smol_dir, encoder=encoder), gguf


def llama_loop(smol, **kwargs):
    from vlmserve.model_repository.llamacpp_engine import LlamaCppLoop

    pipeline, gguf = smol
    return LlamaCppLoop(pipeline, gguf, threads=1, **{"max_batch_tokens": 4096, **kwargs})


def all_back(loop) -> bool:
    """No row holds a sequence: each id is free or holds a parked prompt (at most one per distinct prompt)."""
    return (not loop.rows and not loop.seqs and not loop.prompt_keys
            and sorted([*loop.free, *loop.parked]) == list(range(loop.sequences)))


def run(loop, pipeline, *specs, **params):
    """Queue one job per (prompt, image size) and drain the loop; the jobs and their clients."""
    jobs = [make_job(pipeline, text, size, **params) for text, size in specs]
    for job, _ in jobs:
        loop.add(job)
    loop.drain()
    return jobs


SPECS = [("what is in this picture?", (70, 50)), ("a photo of a cat sitting on a red chair, describe it", None),
         ("hello", (40, 90)), ("two people riding bicycles", None)]


def test_greedy_tokens_and_logprobs_match_the_torch_loop(smol) -> None:
    """Text and image prompts batched together: llama.cpp gives the torch loop's greedy tokens and log
    probabilities (the logits' softmax, every step, top 5 too) within float tolerance."""
    pipeline, _ = smol
    params = {"max_tokens": 10, "logprobs": True, "top_logprobs": 5}
    torch_jobs = run(DecodeLoop(pipeline), pipeline, *SPECS, **params)
    llama_jobs = run(llama_loop(smol), pipeline, *SPECS, **params)
    for (ref, ref_client), (got, client) in zip(torch_jobs, llama_jobs, strict=True):
        assert got.token_ids == ref.token_ids and len(got.token_ids) > 0
        assert client.text == ref_client.text and client.finish == ref_client.finish
        assert client.events[-1][2]["batch_size"] == len(SPECS)
        for a, b in zip(got.logprobs, ref.logprobs, strict=True):
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-3)


def test_rows_joining_mid_decode_keep_their_solo_tokens(smol) -> None:
    pipeline, _ = smol
    alone = [run(llama_loop(smol), pipeline, spec, max_tokens=14)[0][0].token_ids for spec in SPECS[:3]]
    loop = llama_loop(smol)
    jobs = [make_job(pipeline, text, size, max_tokens=14) for text, size in SPECS[:3]]
    loop.add(jobs[1][0])
    loop.add(jobs[2][0])
    for _ in range(3):
        loop.step()
    assert loop.rows == [jobs[1][0], jobs[2][0]] and all(2 < len(j.token_ids) < 14 for j, _ in jobs[1:])
    loop.add(jobs[0][0])
    loop.step()
    assert len(loop.rows) == 3
    loop.drain()
    assert [j.token_ids for j, _ in jobs] == alone
    assert all_back(loop)  # every sequence id is free again, or holds a parked prompt


def test_n_choices_share_one_prefill_and_sample_with_their_own_seeds(smol) -> None:
    pipeline, _ = smol
    alone = [run(llama_loop(smol), pipeline, ("a cat on a mat", (50, 50)), max_tokens=8, temperature=1.0,
                 seed=7 + i)[0][0].token_ids for i in range(3)]
    loop = llama_loop(smol)
    decodes = []
    original = loop.llama.decode
    loop.llama.decode = lambda *a, **k: (decodes.append(k.get("embeddings") is not None), original(*a, **k))[1]
    jobs = [make_job(pipeline, "a cat on a mat", (50, 50), max_tokens=8, temperature=1.0, seed=7) for _ in range(3)]
    first = jobs[0][0]
    for i, (job, _) in enumerate(jobs):
        job.index, job.inputs = i, first.inputs
    first.shared = [j for j, _ in jobs[1:]]
    loop.add(first)
    loop.step()
    assert len(loop.rows) == 3 and decodes.count(True) == 1  # one prefill (the image prompt's embeddings)
    loop.drain()
    assert [j.token_ids for j, _ in jobs] == alone
    assert len({tuple(ids) for ids in alone}) > 1


def test_stop_strings_max_tokens_and_cancellation(smol) -> None:
    pipeline, _ = smol
    prompt = "a dog running in the park with a ball"
    (reference, reference_client), = run(llama_loop(smol), pipeline, (prompt, None), max_tokens=12)
    text = reference_client.text
    assert len(reference.token_ids) == 12 and len(text) > 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    loop = llama_loop(smol)
    short, short_client = make_job(pipeline, prompt, max_tokens=3)
    stopped, stopped_client = make_job(pipeline, prompt, max_tokens=12, stop=(stop,))
    doomed, doomed_client = make_job(pipeline, "tell me a long story", (60, 40), max_tokens=500)
    for job in (short, stopped, doomed):
        loop.add(job)
    loop.step()
    loop.step()
    doomed_client.cancel = True
    loop.drain()
    assert short.token_ids == reference.token_ids[:3] and short_client.finish == "length"
    assert stopped_client.finish == "stop" and stopped_client.text == text[: text.find(stop)]
    assert doomed_client.finish == "cancelled" and doomed_client.events[-1][2]["completion_tokens"] < 500
    assert all_back(loop)


def test_penalties_and_a_schema_row_beside_free_rows(smol) -> None:
    import jsonschema

    pipeline, _ = smol
    prompt = "a dog running in the park with a ball"
    (base, _), = run(llama_loop(smol), pipeline, (prompt, None), max_tokens=16)
    assert len(set(base.token_ids)) < len(base.token_ids), "the tiny model repeats itself greedily"
    loop = llama_loop(smol)
    plain, _ = make_job(pipeline, prompt, max_tokens=16)
    penalised, _ = make_job(pipeline, prompt, max_tokens=16, frequency_penalty=2.0)
    schema, schema_client = make_job(pipeline, "read the receipt", (60, 40), max_tokens=128, temperature=1.0, seed=1,
                                     grammar=loop.grammars.compile({"type": "json_schema", "schema": RECEIPT}))
    for job in (plain, penalised, schema):
        loop.add(job)
    loop.drain()
    assert plain.token_ids == base.token_ids
    assert penalised.token_ids != base.token_ids and len(set(penalised.token_ids)) > len(set(base.token_ids))
    assert schema_client.finish == "stop", schema_client.events
    jsonschema.validate(json.loads(schema_client.text), RECEIPT)


def test_a_failing_prefill_or_row_fails_alone(smol) -> None:
    """A request whose prefill raises fails alone; a row whose decode raises (llama_decode refusing a batch
    that holds its sequence) fails alone, once, and the other rows end as they would have."""
    pipeline, _ = smol
    alone = run(llama_loop(smol), pipeline, SPECS[3], max_tokens=10)[0][0].token_ids
    loop = llama_loop(smol)
    good, good_client = make_job(pipeline, SPECS[3][0], max_tokens=10)
    bad, bad_client = make_job(pipeline, "a broken image", (30, 30), max_tokens=10)
    poisoned, poisoned_client = make_job(pipeline, "a poisoned row", max_tokens=10)
    original = pipeline.prefill_inputs
    loop.family = type("Faulty", (), {})()
    for name in ("model", "tokenizer", "eos_ids", "device", "decode_positions"):
        setattr(loop.family, name, getattr(pipeline, name))

    def prefill(job):
        if job is bad:
            raise ValueError("corrupt image")
        return original(job)

    loop.family.prefill_inputs = prefill
    decode = loop.llama.decode

    def flaky(entries=None, **kwargs):
        if (entries and poisoned in loop.rows and len(poisoned.token_ids) >= 3
                and any(seq == loop.seqs[loop.rows.index(poisoned)] for _, _, seq, _ in entries)):
            raise RuntimeError("llama_decode failed (1: no KV cells left for the batch)")
        return decode(entries, **kwargs)

    loop.llama.decode = flaky
    for job in (good, bad, poisoned):
        loop.add(job)
    loop.drain()
    assert bad_client.finish == "error" and "corrupt image" in bad_client.events[-1][0]
    assert poisoned_client.finish == "error" and "llama_decode failed" in poisoned_client.events[-1][0]
    assert sum(1 for _, f, _ in poisoned_client.events if f == "error") == 1
    assert good.token_ids == alone and good_client.finish in ("stop", "length")
    assert all_back(loop)


def test_kv_budget_makes_jobs_wait_and_sizes_the_context(smol) -> None:
    pipeline, _ = smol
    jobs = [make_job(pipeline, f"question number {i}", max_tokens=6) for i in range(3)]
    longest = max(j.kv_reservation for j, _ in jobs)
    loop = llama_loop(smol, max_batch_tokens=2 * longest)
    assert loop.llama.cells >= 2 * longest  # llama.cpp rounds its context up, never down
    for job, _ in jobs:
        loop.add(job)
    loop.step()
    assert loop.rows == [jobs[0][0], jobs[1][0]] and list(loop.waiting) == [jobs[2][0]]
    loop.drain()
    assert all(c.finish in ("stop", "length") for _, c in jobs)
    assert max(c.events[-1][2]["batch_size"] for _, c in jobs) == 2
    text = pipeline.model.config.get_text_config()
    assert loop.kv_bytes_per_token == text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * 2
    assert math.isfinite(loop.kv_bytes_per_token)


def test_a_repeated_prompt_prefix_is_taken_from_a_parked_sequence(smol) -> None:
    """A second turn that begins with the first turn's prompt computes only its new blocks, and answers what a
    cold loop answers (tokens and log probabilities); the same text with another image shares nothing."""
    pipeline, _ = smol
    system = "You are a careful assistant who describes photographs in plain words. " * 3
    first = (system + "What is in this picture?", (70, 50))
    second = (system + "What is in this picture? And what colour is it, exactly?", (70, 50))
    params = {"max_tokens": 8, "logprobs": True, "top_logprobs": 3}
    cold = run(llama_loop(smol), pipeline, second, **params)[0][0]
    loop = llama_loop(smol)
    run(loop, pipeline, first, **params)
    assert len(loop.parked) == 1 and loop.prefix.hit_tokens == 0
    missed = loop.prefix.missed_tokens
    (warm, _), = run(loop, pipeline, second, **params)
    assert loop.prefix.hit_tokens >= 32 and loop.prefix.hit_tokens % 32 == 0
    assert loop.prefix.missed_tokens - missed == warm.prompt_tokens - loop.prefix.hit_tokens
    assert warm.token_ids == cold.token_ids
    for a, b in zip(warm.logprobs, cold.logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    hits = loop.prefix.hit_tokens
    run(loop, pipeline, (second[0], (90, 60)), **params)  # same ids, another image
    assert loop.prefix.hit_tokens == hits
    assert all_back(loop) and len(loop.parked) == 3
