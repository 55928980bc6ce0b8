"""Continuous batching (vlmserve.model_repository.chat_engine.DecodeLoop) on the tiny Qwen2-VL and SmolVLM2 checkpoints.

The loop is stepped by hand, so "B and C are mid-decode when A joins" is a fact of the test, not a timing.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from vlmserve.api.openai import GenerationParameters
from vlmserve.model_repository.chat_engine import ChatEngine, ChatJob, DecodeLoop


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch
    from transformers import SmolVLMForConditionalGeneration

    from vlmserve.export.tiny import build_tiny_qwen2vl, build_tiny_smolvlm2
    from vlmserve.model_repository.qwen2vl import QwenPipeline
    from vlmserve.model_repository.smolvlm import SmolVLMPipeline, vision_module

    root = tmp_path_factory.mktemp("chat-engine")
    qwen = QwenPipeline(build_tiny_qwen2vl(root / "qwen2vl"))
    smol_dir = build_tiny_smolvlm2(root / "smolvlm2")
    # The Triton model runs the exported ONNX encoder; its torch twin (same graph, parity-checked at export) here.
    vision = vision_module(SmolVLMForConditionalGeneration.from_pretrained(str(smol_dir)).eval())

    def encoder(feeds: dict) -> dict:
        with torch.no_grad():
            out = vision(torch.from_numpy(feeds["pixel_values"]), torch.from_numpy(feeds["patch_attention_mask"]))
        return {"image_features": out.numpy()}

    return {"qwen2vl": qwen, "smolvlm2": SmolVLMPipeline(Path(smol_dir), encoder=encoder)}


FAMILIES = ["qwen2vl", "smolvlm2"]


class Client:
    """What a request's client receives, plus a cancel switch."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict | None]] = []
        self.cancel = False

    def emit(self, text: str, finish: str, usage: dict | None) -> None:
        self.events.append((text, finish, usage))

    @property
    def text(self) -> str:
        return "".join(t for t, f, _ in self.events if f != "error")

    @property
    def finish(self) -> str:
        return self.events[-1][1] if self.events and self.events[-1][1] else ""


def make_job(pipeline, prompt: str, image_size: tuple[int, int] | None = None, **params) -> tuple[ChatJob, Client]:
    content: list[dict] = []
    if image_size:
        content.append({"type": "image", "image": Image.new("RGB", image_size, (30 + image_size[0] % 200, 90, 160))})
    content.append({"type": "text", "text": prompt})
    inputs, prompt_tokens = pipeline.prepare([{"role": "user", "content": content}])
    client = Client()
    grammar = params.pop("grammar", None)  # compiled for the loop's tokenizer: the job's, beside its PARAMETERS
    sampling = GenerationParameters(**{"max_tokens": 10, **params})
    return ChatJob(inputs, sampling, prompt_tokens, client.emit, lambda: client.cancel, grammar=grammar), client


def solo(pipeline, *args, **kwargs) -> tuple[ChatJob, Client]:
    job, client = make_job(pipeline, *args, **kwargs)
    loop = DecodeLoop(pipeline)
    loop.add(job)
    loop.drain()
    return job, client


def trace_decode_logits(loop: DecodeLoop) -> list[tuple[list[ChatJob], object]]:
    """Record every decode step's logits with the jobs in row order (the tiny Qwen2-VL's greedy answer repeats
    one token, so equal tokens alone would not show that positions and masks are right; equal logits do)."""
    trace: list[tuple[list[ChatJob], object]] = []
    decode = loop._decode

    def traced() -> None:
        rows = list(loop.rows)
        hook = loop.family.model.lm_head.register_forward_hook(lambda m, i, out: trace.append((rows, out.clone())))
        try:
            decode()
        finally:
            hook.remove()

    loop._decode = traced
    return trace


def logits_of(trace, job: ChatJob) -> list:
    return [out[rows.index(job)] for rows, out in trace if job in rows]


def test_family_protocol_is_implemented(families) -> None:
    from vlmserve.model_repository.chat_engine import DecoderFamily

    assert all(isinstance(p, DecoderFamily) for p in families.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_solo_decode_matches_transformers_generate(families, family: str) -> None:
    """The loop's own positions (mrope for Qwen2-VL), cache and mask give what ``generate`` computes."""
    import torch

    pipeline = families[family]
    loop = DecodeLoop(pipeline)
    trace = trace_decode_logits(loop)
    job, _ = make_job(pipeline, "what is in this picture?", (70, 50), max_tokens=6)
    kwargs, _ = pipeline.prefill_inputs(job)
    loop.add(job)
    loop.drain()
    mine = logits_of(trace, job)
    assert len(mine) == len(job.token_ids) - 1 == 5
    kwargs.pop("position_ids")  # generate derives them itself
    with torch.no_grad():
        out = pipeline.model.generate(**kwargs, max_new_tokens=6, do_sample=False, eos_token_id=None,
                                      output_logits=True, return_dict_in_generate=True)
    assert out.sequences[0, -6:].tolist() == job.token_ids
    for step, (a, b) in enumerate(zip(mine, out.logits[1:], strict=True)):
        assert torch.allclose(a, b[0], atol=1e-4), (step, float((a - b[0]).abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_join_mid_decode_gives_the_solo_greedy_tokens(families, family: str) -> None:
    import torch

    pipeline = families[family]
    specs = {
        "A": ("what is in this picture?", (70, 50), 8),
        "B": ("a photo of a cat sitting on a red chair, describe it at length please", None, 14),
        "C": ("hello", (40, 90), 14),
    }
    alone = {}
    for key, (text, size, n) in specs.items():
        loop = DecodeLoop(pipeline)
        trace = trace_decode_logits(loop)
        job, _ = make_job(pipeline, text, size, max_tokens=n)
        loop.add(job)
        loop.drain()
        alone[key] = (job.token_ids, logits_of(trace, job))
    assert all(ids for ids, _ in alone.values()), alone

    loop = DecodeLoop(pipeline)
    trace = trace_decode_logits(loop)
    jobs = {k: make_job(pipeline, text, size, max_tokens=n) for k, (text, size, n) in specs.items()}
    loop.add(jobs["B"][0])
    loop.add(jobs["C"][0])
    for _ in range(3):
        loop.step()
    assert loop.rows == [jobs["B"][0], jobs["C"][0]]  # both mid-decode
    assert all(2 < len(jobs[k][0].token_ids) < 14 for k in "BC")
    loop.add(jobs["A"][0])
    loop.step()
    assert jobs["A"][0] in loop.rows and len(loop.rows) == 3
    loop.drain()
    for key in "ABC":
        job, client = jobs[key]
        assert job.token_ids == alone[key][0], key
        joined = logits_of(trace, job)
        assert len(joined) == len(alone[key][1]) > 0
        for step, (a, b) in enumerate(zip(joined, alone[key][1], strict=True)):
            assert torch.allclose(a, b, atol=1e-4), (key, step, float((a - b).abs().max()))
        assert client.finish in ("stop", "length")
        assert client.events[-1][2]["completion_tokens"] == len(job.token_ids)
    assert jobs["A"][1].events[-1][2]["batch_size"] == 3
    assert loop.kv.nbytes == 0 and not loop.rows  # finished rows took their KV with them


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_max_tokens_and_stop_strings(families, family: str) -> None:
    pipeline = families[family]
    prompt = "a dog running in the park with a ball"
    reference, reference_client = solo(pipeline, prompt, max_tokens=12)
    text = reference_client.text
    assert len(reference.token_ids) == 12 and len(text) > 4, "the tiny model should talk for 12 tokens"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    expected = text[: text.find(stop)]

    loop = DecodeLoop(pipeline)
    short, short_client = make_job(pipeline, prompt, max_tokens=3)
    stopped, stopped_client = make_job(pipeline, prompt, max_tokens=12, stop=(stop,))
    longer, longer_client = make_job(pipeline, "the quick brown fox", (50, 50), max_tokens=12)
    for job in (short, stopped, longer):
        loop.add(job)
    loop.drain()
    assert short.token_ids == reference.token_ids[:3] and short_client.finish == "length"
    assert short_client.text == pipeline.tokenizer.decode(reference.token_ids[:3], skip_special_tokens=True)
    assert stopped_client.finish == "stop" and stopped_client.text == expected
    assert stop not in stopped_client.text
    assert longer_client.finish in ("stop", "length") and len(longer.token_ids) <= 12


@pytest.mark.parametrize("family", FAMILIES)
def test_cancellation_frees_the_row(families, family: str) -> None:
    pipeline = families[family]
    keep_alone = solo(pipeline, "two people riding bicycles", max_tokens=12)[0].token_ids
    loop = DecodeLoop(pipeline)
    doomed, doomed_client = make_job(pipeline, "tell me a long story", (60, 40), max_tokens=500)
    keep, keep_client = make_job(pipeline, "two people riding bicycles", max_tokens=12)
    loop.add(doomed)
    loop.add(keep)
    loop.step()
    loop.step()
    assert len(loop.rows) == 2
    doomed_client.cancel = True
    loop.step()
    assert loop.rows == [keep]
    assert loop.lengths.shape == (1,) and loop.positions.shape == (1,)  # its row is gone; keep moved to slot 0
    assert doomed_client.finish == "cancelled" and doomed_client.events[-1][2]["completion_tokens"] < 500
    loop.drain()
    assert keep.token_ids == keep_alone and keep_client.finish in ("stop", "length")


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cap_makes_jobs_wait_then_complete(families, family: str) -> None:
    pipeline = families[family]
    jobs = [make_job(pipeline, f"question number {i}", max_tokens=6) for i in range(3)]
    longest = max(j.kv_reservation for j, _ in jobs)
    loop = DecodeLoop(pipeline, max_batch=8, max_batch_tokens=2 * longest)  # room for two rows, not three
    for job, _ in jobs:
        loop.add(job)
    loop.step()
    assert loop.rows == [jobs[0][0], jobs[1][0]] and list(loop.waiting) == [jobs[2][0]]
    assert jobs[2][1].events == []  # waiting, not refused
    steps = 1
    while loop.busy:
        assert loop.kv_bound(loop.rows) <= 2 * longest
        assert loop.kv.rows <= 2  # KV slots held: what the budget allows at this length
        loop.step()
        steps += 1
    assert all(c.finish in ("stop", "length") for _, c in jobs)
    assert max(c.events[-1][2]["batch_size"] for _, c in jobs) == 2
    alone = solo(pipeline, "question number 2", max_tokens=6)[0].token_ids
    assert jobs[2][0].token_ids == alone


def test_max_batch_caps_the_rows(families) -> None:
    pipeline = families["qwen2vl"]
    loop = DecodeLoop(pipeline, max_batch=2)
    jobs = [make_job(pipeline, f"hi {i}", max_tokens=4)[0] for i in range(3)]
    for job in jobs:
        loop.add(job)
    loop.step()
    assert len(loop.rows) == 2 and len(loop.waiting) == 1
    loop.drain()
    assert all(j.finish for j in jobs)


def test_interactive_rows_are_admitted_before_batch_rows(families) -> None:
    pipeline = families["qwen2vl"]
    loop = DecodeLoop(pipeline, max_batch=2)
    batch = [make_job(pipeline, f"batch {i}", max_tokens=4)[0] for i in range(3)]
    interactive = [make_job(pipeline, f"chat {i}", max_tokens=4)[0] for i in range(2)]
    for job in batch:
        job.background = True
        loop.add(job)
    for job in interactive:
        loop.add(job)  # queued after the batch rows, admitted before them
    assert list(loop.waiting) == [*interactive, *batch]
    loop.step()
    assert loop.rows == interactive
    loop.drain()
    assert all(j.finish for j in batch + interactive)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_failing_prefill_fails_only_its_request(families, family: str) -> None:
    pipeline = families[family]
    alone = {k: solo(pipeline, f"the city at night {k}", max_tokens=8)[0].token_ids for k in "BC"}
    loop = DecodeLoop(pipeline)
    b, b_client = make_job(pipeline, "the city at night B", max_tokens=8)
    bad, bad_client = make_job(pipeline, "look at this", (64, 64), max_tokens=8)
    c, c_client = make_job(pipeline, "the city at night C", max_tokens=8)
    # Vision input for fewer image tokens than the prompt holds: the features do not fit the prompt.
    if family == "qwen2vl":
        bad.inputs["image_grid_thw"] = bad.inputs["image_grid_thw"].new_tensor([[1, 2, 2]])  # 1 token, not 4
        bad.inputs["pixel_values"] = bad.inputs["pixel_values"][:4]
    else:
        bad.inputs["pixel_values"] = bad.inputs["pixel_values"][:1]  # 1 tile of the 5
        bad.inputs["patch_attention_mask"] = bad.inputs["patch_attention_mask"][:1]
    loop.add(b)
    loop.step()
    loop.add(bad)
    loop.add(c)
    loop.drain()
    assert bad_client.finish == "error" and len(bad_client.events) == 1
    message = bad_client.events[0][0]
    assert message.startswith("generation failed: ") and "Traceback" not in message
    assert b.token_ids == alone["B"] and c.token_ids == alone["C"]
    assert b_client.finish in ("stop", "length") and c_client.finish in ("stop", "length")


def test_engine_thread_serves_concurrent_submissions(families) -> None:
    pipeline = families["smolvlm2"]
    engine = ChatEngine(pipeline, max_batch=4)
    done = threading.Event()
    clients = []
    try:
        for i in range(5):
            job, client = make_job(pipeline, f"picture {i}", (30 + 10 * i, 40), max_tokens=5)
            original = client.emit

            def emit(text, finish, usage, original=original):
                original(text, finish, usage)
                if finish and sum(bool(c.finish) for c in clients) == 5:
                    done.set()

            job.emit = emit
            clients.append(client)
            engine.submit(job)
        assert done.wait(120), [c.events for c in clients]
    finally:
        engine.stop()
    assert all(c.finish in ("stop", "length") for c in clients)
    assert not engine.thread.is_alive()


def test_pipelines_without_the_protocol_keep_the_static_path() -> None:
    batches: list[int] = []
    finished = threading.Event()

    class Static:
        def run_batch(self, jobs: list[ChatJob]) -> None:
            batches.append(len(jobs))
            for job in jobs:
                job.finish = "stop"
                job.emit("ok", "stop", {"prompt_tokens": 0, "completion_tokens": 1, "batch_size": len(jobs)})
            finished.set()

    engine = ChatEngine(Static(), max_batch=4, window_s=0.01)
    try:
        assert engine.loop is None
        got: list = []
        engine.submit(ChatJob(None, GenerationParameters(max_tokens=4), 0, lambda t, f, u: got.append((t, f))))
        assert finished.wait(10)
    finally:
        engine.stop()
    assert got == [("ok", "stop")] and batches == [1]


def test_a_client_whose_sender_breaks_loses_only_its_row(families) -> None:
    pipeline = families["smolvlm2"]
    alone = solo(pipeline, "a bowl of fresh fruit", max_tokens=8)[0].token_ids
    loop = DecodeLoop(pipeline)
    good, good_client = make_job(pipeline, "a bowl of fresh fruit", max_tokens=8)
    broken, _ = make_job(pipeline, "a train arriving", max_tokens=8)
    calls = []

    def emit(text: str, finish: str, usage: dict | None) -> None:
        calls.append(finish)
        if len(calls) == 2:
            raise ConnectionError("client went away")

    broken.emit = emit
    loop.add(good)
    loop.add(broken)
    loop.drain()
    assert broken.finish == "error" and len(calls) >= 2
    assert good.token_ids == alone and good_client.finish in ("stop", "length")


def test_smolvlm2_bf16_decoder_serves_images_and_joins(families) -> None:
    """decoder_precision=bf16 (chosen at export on bf16 hosts): bf16 weights and KV, image features spliced in
    bf16, rows still join a running batch; the first-token logits stay close to the fp32 pipeline's."""
    import torch

    from vlmserve.model_repository.smolvlm import SmolVLMPipeline

    fp32 = families["smolvlm2"]
    bf16 = SmolVLMPipeline(fp32.model.name_or_path, encoder=fp32.encoder, decoder_precision="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    logits = {}
    for name, pipeline in (("fp32", fp32), ("bf16", bf16)):
        job, _ = make_job(pipeline, "what is in this picture?", (70, 50))
        kwargs, _ = pipeline.prefill_inputs(job)
        with torch.no_grad():
            hidden = pipeline.model.model(**kwargs).last_hidden_state
            logits[name] = pipeline.model.lm_head(hidden[:, -1]).float()[0]
    assert float(torch.nn.functional.cosine_similarity(logits["fp32"], logits["bf16"], dim=0)) > 0.99
    loop = DecodeLoop(bf16)
    first, first_client = make_job(bf16, "hello", max_tokens=6)
    second, second_client = make_job(bf16, "what is in this picture?", (70, 50), max_tokens=4)
    loop.add(first)
    loop.step()
    loop.add(second)
    loop.drain()
    assert first_client.finish in ("stop", "length") and second_client.finish in ("stop", "length")
    assert second_client.events[-1][2]["batch_size"] == 2 and second.token_ids
    with pytest.raises(ValueError, match="decoder_precision"):
        SmolVLMPipeline(fp32.model.name_or_path, encoder=fp32.encoder, decoder_precision="int4")


# --- issue 15: structured outputs, logprobs, n choices, penalties (all per row, in one batch) -----------------

# Bounded: at most ~100 bytes of JSON, so 128 tokens always reach the closing brace, whatever random weights say.
RECEIPT = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["name", "age", "ok", "color"],
    "additionalProperties": False,
}


def grammar(loop: DecodeLoop, spec: dict) -> str:
    return loop.grammars.compile(spec)


@pytest.mark.parametrize("family", FAMILIES)
def test_schema_rows_and_free_rows_share_a_batch(families, family: str) -> None:
    import jsonschema

    pipeline = families[family]
    free_alone = solo(pipeline, "two people riding bicycles", max_tokens=12)[0].token_ids
    loop = DecodeLoop(pipeline)
    free, free_client = make_job(pipeline, "two people riding bicycles", max_tokens=12)
    schema_rows = [make_job(pipeline, "read the receipt", (60, 40), max_tokens=128, temperature=t, seed=s,
                            grammar=grammar(loop, {"type": "json_schema", "schema": RECEIPT}))
                   for t, s in ((0.0, None), (1.0, 1), (1.0, 2))]
    obj, obj_client = make_job(pipeline, "any JSON", max_tokens=128, temperature=0.7, seed=4,
                               grammar=grammar(loop, {"type": "json_object"}))
    loop.add(free)
    loop.step()
    for job, _ in schema_rows:
        loop.add(job)
    loop.add(obj)
    loop.step()
    assert len(loop.rows) >= 4  # constrained and free rows in one decode step
    loop.drain()
    assert free.token_ids == free_alone  # the masks of other rows do not touch this one
    for _, client in schema_rows:
        assert client.finish == "stop", client.events
        jsonschema.validate(json.loads(client.text), RECEIPT)
        assert client.events[-1][2]["batch_size"] >= 4
    # json_object has no length bound: with random weights it may run to max_tokens (then it is cut, honestly).
    if obj_client.finish == "stop":
        assert isinstance(json.loads(obj_client.text), dict)
    else:
        assert obj_client.finish == "length" and obj_client.text.startswith("{")


def test_schema_row_cut_by_max_tokens_finishes_with_length(families) -> None:
    pipeline = families["qwen2vl"]
    loop = DecodeLoop(pipeline)
    # 16 tokens cannot hold 200 characters: the document is cut whatever the weights say.
    spec = {"type": "json_schema", "schema": {"type": "object", "required": ["story"],
                                              "properties": {"story": {"type": "string", "minLength": 200}}}}
    job, client = make_job(pipeline, "tell a story", max_tokens=16, grammar=grammar(loop, spec))
    loop.add(job)
    loop.drain()
    assert client.finish == "length" and len(job.token_ids) == 16
    assert client.text.startswith('{"story')
    with pytest.raises(json.JSONDecodeError):
        json.loads(client.text)


def test_bad_schemas_are_refused_at_compile_time(families) -> None:
    from vlmserve.model_repository.structured import GrammarError

    loop = DecodeLoop(families["smolvlm2"])
    for bad in ({"type": "nonsense"}, {"$ref": "#/missing"}):
        with pytest.raises(GrammarError, match="not supported"):
            grammar(loop, {"type": "json_schema", "schema": bad})


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_are_the_models_distribution(families, family: str) -> None:
    """Each token's logprob is log_softmax of the logits that step computed, the greedy token is the most likely,
    and top_logprobs are sorted, each <= 0, and sum to at most probability 1."""
    import math

    import torch

    pipeline = families[family]
    loop = DecodeLoop(pipeline)
    trace = trace_decode_logits(loop)
    job, client = make_job(pipeline, "what is in this picture?", (70, 50), max_tokens=6, logprobs=True,
                           top_logprobs=5)
    plain, _ = make_job(pipeline, "what is in this picture?", (70, 50), max_tokens=6)
    loop.add(job)
    loop.add(plain)
    loop.drain()
    assert job.token_ids == plain.token_ids  # asking for logprobs changes no token
    assert [e.token for e in job.logprobs] == job.token_ids
    for entry in job.logprobs:
        assert entry.top[0][0] == entry.token and entry.logprob == pytest.approx(entry.top[0][1])
        values = [lp for _, lp in entry.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-5
    steps = logits_of(trace, job)  # decode steps produce tokens 2..n
    for entry, logits in zip(job.logprobs[1:], steps, strict=False):
        expected = float(torch.log_softmax(logits.float(), dim=-1)[entry.token])
        assert entry.logprob == pytest.approx(expected, abs=1e-4)
    assert client.finish in ("stop", "length")


@pytest.mark.parametrize("family", FAMILIES)
def test_n_choices_share_one_prefill(families, family: str) -> None:
    pipeline = families[family]
    alone = [solo(pipeline, "a cat on a mat", (50, 50), max_tokens=8, temperature=1.0, seed=7 + i)[0].token_ids
             for i in range(3)]
    loop = DecodeLoop(pipeline)
    prefills = []
    original = pipeline.prefill_inputs
    loop.family = type("Counting", (), {})()  # a view of the pipeline that counts prefills
    for name in ("model", "tokenizer", "eos_ids", "device", "decode_positions"):
        setattr(loop.family, name, getattr(pipeline, name))
    loop.family.prefill_inputs = lambda job: (prefills.append(job), original(job))[1]
    jobs = [make_job(pipeline, "a cat on a mat", (50, 50), max_tokens=8, temperature=1.0, seed=7)
            for _ in range(3)]
    first = jobs[0][0]
    for i, (job, _) in enumerate(jobs):
        job.index = i
        job.inputs = first.inputs
    first.shared = [j for j, _ in jobs[1:]]
    loop.add(first)
    loop.step()
    assert len(loop.rows) == 3 and len(prefills) == 1
    loop.drain()
    assert [j.token_ids for j, _ in jobs] == alone  # choice i samples with seed + i
    assert len({tuple(ids) for ids in alone}) > 1  # and the choices differ
    assert all(c.finish in ("stop", "length") for _, c in jobs)


@pytest.mark.parametrize("family", FAMILIES)
def test_penalties_change_the_output_per_row(families, family: str) -> None:
    pipeline = families[family]
    prompt = "a dog running in the park with a ball"
    base = solo(pipeline, prompt, max_tokens=16)[0].token_ids
    assert len(set(base)) < len(base), "the tiny model repeats itself greedily"
    loop = DecodeLoop(pipeline)
    plain, _ = make_job(pipeline, prompt, max_tokens=16)
    presence, _ = make_job(pipeline, prompt, max_tokens=16, presence_penalty=2.0)
    frequency, _ = make_job(pipeline, prompt, max_tokens=16, frequency_penalty=2.0)
    repetition, _ = make_job(pipeline, prompt, max_tokens=16, repetition_penalty=1.8)
    for job in (plain, presence, frequency, repetition):
        loop.add(job)
    loop.drain()
    assert plain.token_ids == base  # unpenalised rows in the same batch are untouched
    for job in (presence, frequency, repetition):
        assert job.token_ids != base
        assert len(set(job.token_ids)) > len(set(base))  # fewer repeats


def test_a_vanishing_temperature_samples_greedily_instead_of_failing() -> None:
    # Found by schemathesis: temperature=5e-324 made logits / temperature overflow, and multinomial refused the
    # nan probabilities (a 502 for the whole request). Its limit is greedy, which is what the row now does.
    import torch

    from vlmserve.model_repository.chat_engine import RowSampler

    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    sampler = RowSampler(GenerationParameters(max_tokens=4, temperature=5e-324, seed=1))
    assert sampler(logits) == 1


# --- isolation: a failing decode forward fails only the row(s) that cause it ----------------------------------


class DecodeFault:
    """Makes the decoder raise part-way through a decode forward (in its last layer: the others have already written
    their keys and values) when ``when(input ids)`` says so; records each decode forward's batch size."""

    def __init__(self, pipeline, when) -> None:
        backbone = pipeline.model.model
        text = getattr(backbone, "language_model", None) or backbone.text_model
        assert len(text.layers) > 1
        self.when = when
        self.armed = False
        self.forwards: list[int] = []
        self.hooks = [text.embed_tokens.register_forward_pre_hook(self._see),
                      text.layers[-1].register_forward_pre_hook(self._raise, with_kwargs=True)]

    def _see(self, module, args) -> None:
        ids = args[0]
        self.armed = False
        if ids.dim() == 2 and ids.shape[1] == 1:  # a decode step: one token per row (prefills embed prompts)
            self.forwards.append(ids.shape[0])
            self.armed = self.when(ids[:, 0].tolist())

    def _raise(self, module, args, kwargs) -> None:
        if self.armed:
            raise RuntimeError("poisoned row")

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def loop_state(loop: DecodeLoop) -> dict:
    """Each row's length, position, next token and the KV columns it holds (those past its length are unread)."""
    lengths = loop.lengths.tolist()
    return {"lengths": loop.lengths.clone(), "positions": loop.positions.clone(), "next": loop.next_tokens.clone(),
            "kv": [buf[row, :, :n].clone() for store in (loop.kv.keys, loop.kv.values) for buf in store
                   for row, n in enumerate(lengths)]}


def unused_token(pipeline, *jobs: ChatJob) -> int:
    from vlmserve.model_repository.chat_engine import vocab_size

    used = {t for job in jobs for t in job.token_ids}
    return next(t for t in range(vocab_size(pipeline)) if t not in used and t not in pipeline.eos_ids)


def assert_failed_once(client: Client) -> None:
    """The client's answer ended with one error (after the text streamed before it, if any) and nothing else."""
    assert [f for _, f, _ in client.events if f] == ["error"] and client.finish == "error", client.events
    assert client.events[-1][0] == "generation failed: RuntimeError: poisoned row"


ROWS = {"B": ("a photo of a cat sitting on a red chair, describe it at length please", None),
        "C": ("hello", (40, 90)), "D": ("the quick brown fox", (50, 50))}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_whose_decode_forward_fails_fails_alone(families, family: str, caplog) -> None:
    """B, a poisoned row and C decode together; the poisoned row's forward raises half-way through the batch's
    forward. It alone gets the error; B and C carry on from a cache equal to a clean run's and give byte-identical
    output, and D joins the recovered batch as if nothing happened."""
    import logging

    import torch

    pipeline = families[family]
    clean = DecodeLoop(pipeline)
    ref = {k: make_job(pipeline, text, size, max_tokens=12) for k, (text, size) in ROWS.items()}
    clean.add(ref["B"][0])
    clean.add(ref["C"][0])
    for _ in range(4):
        clean.step()
    assert clean.rows == [ref["B"][0], ref["C"][0]]
    state = loop_state(clean)
    clean.add(ref["D"][0])
    clean.drain()
    poison = unused_token(pipeline, *(job for job, _ in ref.values()))

    loop = DecodeLoop(pipeline)
    jobs = {k: make_job(pipeline, text, size, max_tokens=12) for k, (text, size) in ROWS.items()}
    bad, bad_client = make_job(pipeline, "look at this", (64, 64), max_tokens=12)
    loop.add(jobs["B"][0])
    loop.add(bad)
    loop.add(jobs["C"][0])
    for _ in range(3):
        loop.step()
    assert loop.rows == [jobs["B"][0], bad, jobs["C"][0]]
    fault = DecodeFault(pipeline, lambda ids: poison in ids)
    try:
        with torch.inference_mode():
            loop.next_tokens[1] = poison
        with caplog.at_level(logging.WARNING, logger="vlmserve.chat"):
            loop.step()
        # The batch (3 rows), each row alone, then the two survivors once more.
        assert fault.forwards == [3, 1, 1, 1, 2]
        assert_failed_once(bad_client)
        assert loop.rows == [jobs["B"][0], jobs["C"][0]]
        mine = loop_state(loop)
        for key in ("lengths", "positions", "next"):
            assert torch.equal(mine[key], state[key]), key
        for kv, kv0 in zip(mine["kv"], state["kv"], strict=True):
            assert kv.shape == kv0.shape and torch.allclose(kv, kv0, atol=1e-4)
        loop.add(jobs["D"][0])
        loop.drain()
    finally:
        fault.remove()
    for key in ROWS:
        (job, client), (want, want_client) = jobs[key], ref[key]
        assert job.token_ids == want.token_ids, key
        assert [e[:2] for e in client.events] == [e[:2] for e in want_client.events], key
        assert client.finish in ("stop", "length")
    records = [r for r in caplog.records if r.name == "vlmserve.chat"]
    assert [r.levelname for r in records] == ["ERROR", "WARNING"]
    assert records[0].exc_info and not records[1].exc_info and "row 1 of 3 fails alone" in records[1].getMessage()


@pytest.mark.parametrize("fault_kind", ["every forward", "batch only", "poisoned row, then the batch", "one row"])
def test_a_decode_failure_no_row_explains_fails_the_batch_once(families, fault_kind: str) -> None:
    """When the rows fail alone too, each gets its own error; when they pass alone but the batch fails (e.g. out
    of memory), or the batch still fails without the poisoned row, every row fails, once: no retry loop. Then the
    loop serves a new request as if nothing had happened."""
    import torch

    pipeline = families["qwen2vl"]
    loop = DecodeLoop(pipeline)
    count = 1 if fault_kind == "one row" else 3
    jobs = [make_job(pipeline, f"a red bus on a bridge, number {i}", (40 + 10 * i, 50), max_tokens=12)
            for i in range(count)]
    for job, _ in jobs:
        loop.add(job)
    loop.step()
    loop.step()
    assert len(loop.rows) == count
    poison = unused_token(pipeline)
    when, forwards = {
        "every forward": (lambda ids: True, [3, 1, 1, 1]),
        "batch only": (lambda ids: len(ids) > 1, [3, 1, 1, 1]),
        "poisoned row, then the batch": (lambda ids: poison in ids or len(ids) > 1, [3, 1, 1, 1, 2]),
        "one row": (lambda ids: True, [1]),
    }[fault_kind]
    if fault_kind.startswith("poisoned"):
        assert poison not in loop.next_tokens.tolist()
        with torch.inference_mode():
            loop.next_tokens[1] = poison
    fault = DecodeFault(pipeline, when)
    try:
        loop.step()
    finally:
        fault.remove()
    assert fault.forwards == forwards
    assert not loop.rows and loop.kv.nbytes == 0 and not loop.busy
    for _, client in jobs:
        assert_failed_once(client)
    fresh, fresh_client = make_job(pipeline, "the city at night", max_tokens=8)
    loop.add(fresh)
    loop.drain()
    assert fresh.token_ids == solo(pipeline, "the city at night", max_tokens=8)[0].token_ids
    assert fresh_client.finish in ("stop", "length")


def test_a_failing_static_batch_is_retried_job_by_job() -> None:
    """The static path (DeepSeek-OCR: run_batch answers its jobs one after another): a job that makes run_batch
    raise fails alone; the jobs answered before it are not run again, those after it are run alone."""
    runs: list[list[str]] = []
    finished = threading.Event()

    class Static:
        def run_batch(self, jobs: list[ChatJob]) -> None:
            runs.append([job.inputs for job in jobs])
            for job in jobs:
                if job.inputs == "bad":
                    raise RuntimeError("poisoned row")
                job.finish = "stop"
                job.emit(f"ok {job.inputs}", "stop", {"prompt_tokens": 0, "completion_tokens": 1, "batch_size": 1})

    clients = {name: Client() for name in ("a", "bad", "c")}

    def emit(client: Client):
        def send(text: str, finish: str, usage: dict | None) -> None:
            client.emit(text, finish, usage)
            if all(c.finish for c in clients.values()):
                finished.set()
        return send

    engine = ChatEngine(Static(), max_batch=3, window_s=5.0)  # the batch closes when its third job arrives
    try:
        for name, client in clients.items():
            engine.submit(ChatJob(name, GenerationParameters(max_tokens=4), 0, emit(client)))
        assert finished.wait(10), {k: c.events for k, c in clients.items()}
    finally:
        engine.stop()
    assert runs == [["a", "bad", "c"], ["bad"], ["c"]]
    assert clients["a"].events == [("ok a", "stop", {"prompt_tokens": 0, "completion_tokens": 1, "batch_size": 1})]
    assert clients["c"].events == [("ok c", "stop", {"prompt_tokens": 0, "completion_tokens": 1, "batch_size": 1})]
    assert_failed_once(clients["bad"])


LONG_SYSTEM = ("You are a careful assistant for a photo library. Answer in short plain sentences, name the objects "
               "you see, their colours and where they are, and never invent what the picture does not show. ") * 2


def conversation(pipeline, question: str, image_size: tuple[int, int] | None = None, earlier: list | None = None,
                 **params) -> tuple[ChatJob, Client]:
    content: list[dict] = []
    if image_size:
        content.append({"type": "image", "image": Image.new("RGB", image_size, (30 + image_size[0] % 200, 90, 160))})
    content.append({"type": "text", "text": question})
    messages = [{"role": "system", "content": [{"type": "text", "text": LONG_SYSTEM}]}, *(earlier or []),
                {"role": "user", "content": content}]
    inputs, prompt_tokens = pipeline.prepare(messages)
    client = Client()
    return ChatJob(inputs, GenerationParameters(**{"max_tokens": 8, **params}), prompt_tokens, client.emit), client


class PrefillWidths:
    """Records the number of prompt tokens each prefill forward computes (rows x tokens)."""

    def __init__(self, pipeline) -> None:
        backbone = pipeline.model.model
        text = getattr(backbone, "language_model", None) or backbone.text_model
        self.widths: list[tuple[int, int]] = []
        self.hook = text.layers[0].register_forward_pre_hook(self._see, with_kwargs=True)

    def _see(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            self.widths.append((hidden.shape[0], hidden.shape[1]))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_repeated_prompt_prefix_is_not_computed_again(families, family: str) -> None:
    """The second request with the same system prompt (and the second turn of a conversation) takes the KV of its
    whole 32-token blocks from the prefix cache and computes only the rest; its tokens and logits are those of a
    cold run."""
    import torch

    pipeline = families[family]
    cold_job, _ = conversation(pipeline, "what is in the second picture?", max_tokens=8)
    cold = DecodeLoop(pipeline, prefix_cache_bytes=0)
    cold_trace = trace_decode_logits(cold)
    cold.add(cold_job)
    cold.drain()
    assert cold.prefix.hit_tokens == 0

    loop = DecodeLoop(pipeline)
    trace = trace_decode_logits(loop)
    first, _ = conversation(pipeline, "what is in the first picture?", max_tokens=8)
    loop.add(first)
    loop.drain()
    assert loop.prefix.hit_tokens == 0 and loop.prefix.store.bytes > 0
    widths = PrefillWidths(pipeline)
    try:
        again, client = conversation(pipeline, "what is in the second picture?", max_tokens=8)
        loop.add(again)
        loop.drain()
    finally:
        widths.hook.remove()
    shared = loop.prefix.hit_tokens
    assert shared >= 32 and shared % loop.prefix.block == 0
    assert widths.widths == [(1, again.prompt_tokens - shared)]  # only the tokens after the cached blocks
    assert again.token_ids == cold_job.token_ids and client.finish in ("stop", "length")
    for a, b in zip(logits_of(trace, again), logits_of(cold_trace, cold_job), strict=True):
        assert torch.allclose(a, b, atol=1e-4)

    # The next turn of that conversation begins with all of the previous prompt.
    answer = pipeline.tokenizer.decode(again.token_ids, skip_special_tokens=True)
    earlier = [{"role": "user", "content": [{"type": "text", "text": "what is in the second picture?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    turn, _ = conversation(pipeline, "and what colour is it?", earlier=earlier, max_tokens=4)
    before = loop.prefix.hit_tokens
    loop.add(turn)
    loop.drain()
    assert loop.prefix.hit_tokens - before >= shared


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prefix_cache_never_mixes_images(families, family: str) -> None:
    """The same text with another image shares no block: keys cover the request's pixels."""
    pipeline = families[family]
    loop = DecodeLoop(pipeline)
    for size in ((64, 48), (48, 64)):
        job, _ = conversation(pipeline, "describe it", size, max_tokens=4)
        loop.add(job)
        loop.drain()
    assert loop.prefix.hit_tokens == 0
    job, _ = conversation(pipeline, "describe it again", (64, 48), max_tokens=4)
    loop.add(job)
    loop.drain()
    assert loop.prefix.hit_tokens > 0  # the same image again: its blocks are reused
    alone = DecodeLoop(pipeline, prefix_cache_bytes=0)
    cold, _ = conversation(pipeline, "describe it again", (64, 48), max_tokens=4)
    alone.add(cold)
    alone.drain()
    assert job.token_ids == cold.token_ids


def test_a_burst_of_prompts_is_prefilled_within_the_token_budget(families) -> None:
    """One step prefills at most max_prefill_tokens of prompts (always at least one request); the rest join at
    the next steps while the first rows decode, and every answer is the solo one."""
    pipeline = families["smolvlm2"]
    jobs = [make_job(pipeline, f"a long question about picture number {i}, " * 3, max_tokens=6) for i in range(3)]
    budget = jobs[0][0].prompt_tokens + jobs[1][0].prompt_tokens - 1  # room for one prompt, not two
    loop = DecodeLoop(pipeline, max_prefill_tokens=budget)
    for job, _ in jobs:
        loop.add(job)
    loop.step()
    assert loop.rows == [jobs[0][0]] and len(loop.waiting) == 2
    loop.step()
    assert loop.rows == [jobs[0][0], jobs[1][0]] and len(jobs[0][0].token_ids) == 3  # it kept decoding
    loop.drain()
    for i, (job, client) in enumerate(jobs):
        alone = solo(pipeline, f"a long question about picture number {i}, " * 3, max_tokens=6)[0]
        assert job.token_ids == alone.token_ids and client.finish in ("stop", "length")
