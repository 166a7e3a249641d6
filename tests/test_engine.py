"""The decode loop on tiny real models: batched == unbatched, raw log-probs, sampling seeds, stops, EOS."""

import math
import os

import pytest
import torch
from helpers import PROMPTS, assert_same_completions, cpu_only, ids_of, plain_logprobs

from runner import GenerationParams
from runner import engine as engine_mod
from runner.batching import encode, left_pad, plan_batches


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_greedy_equals_one_at_a_time(request, engine_name, penalty):
    engine = request.getfixturevalue(engine_name)
    prompts = ids_of(engine, PROMPTS)
    assert len({len(p) for p in prompts}) > 3  # really mixed lengths, so padding is exercised
    params = GenerationParams(max_new_tokens=12, repetition_penalty=penalty)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert_same_completions(batched, single)
    assert len({tuple(c.token_ids) for c in batched}) > 1  # the model is not degenerate


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
@pytest.mark.parametrize("how", ["row_per_group", "one_group", "grow_every_3", "transformers_cache"])
def test_grouped_prefill_and_growing_cache_change_nothing(request, monkeypatch, engine_name, how):
    """However the batch is prefilled (a group per row, one group) and however its KV cache grows (in place
    in small chunks, or transformers' own cache), every row gets what it gets alone."""
    from runner import kvcache

    engine = request.getfixturevalue(engine_name)
    prompts = ids_of(engine, PROMPTS)
    params = GenerationParams(max_new_tokens=12, repetition_penalty=1.2)
    single = [engine.generate([p], params)[0] for p in prompts]
    if how == "row_per_group":
        monkeypatch.setattr(engine, "prefill_tokens", 1)
    elif how == "one_group":
        monkeypatch.setattr(engine, "prefill_tokens", 10**6)
        monkeypatch.setattr("runner.engine.PREFILL_MIN_FILL", 0.0)
    elif how == "grow_every_3":
        monkeypatch.setattr(kvcache, "GROW_TOKENS", 3)
        monkeypatch.setattr(engine, "prefill_tokens", 1)
    else:
        monkeypatch.setattr(engine, "_merge_caches", False)
    groups = engine_mod.prefill_groups([len(p) for p in prompts], engine.prefill_tokens)
    assert len(groups) == {"row_per_group": len(prompts), "one_group": 1}.get(how, len(groups))
    assert_same_completions(engine.generate(prompts, params), single)


GROUP_LENGTHS = [3, 200, 40, 41, 199, 5, 4, 120, 1, 60]


@pytest.mark.parametrize("budget", [1, 100, 400, 2048])
def test_prefill_groups_cover_every_row_once_within_budget(budget):
    lengths = GROUP_LENGTHS
    groups = engine_mod.prefill_groups(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = max(lengths[i] for i in g)
        assert len(g) == 1 or width * len(g) <= budget
        assert sum(lengths[i] for i in g) >= 0.9 * width * len(g)
    if budget == 1:
        assert groups == [[i] for i in sorted(range(10), key=lambda i: -lengths[i])]


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_merged_cache_is_used_for_plain_attention_models(request, engine_name):
    from runner import kvcache

    engine = request.getfixturevalue(engine_name)
    ids, mask = left_pad(ids_of(engine, PROMPTS)[:2], engine.pad_id, engine.device)
    with torch.inference_mode():
        _, cache = engine._forward(ids, mask, engine_mod._positions(mask), None, last_only=True)
    assert kvcache.mergeable(cache)
    merged = kvcache.merge_prefills([cache], 5)
    assert merged.get_seq_length() == ids.shape[1]
    assert type(merged.layers[0]).__name__ == "GrowingLayer"


def test_logprobs_match_a_plain_forward_pass(gpt2_engine):
    engine = gpt2_engine
    prompts = ids_of(engine, PROMPTS)
    for prompt, comp in zip(
        prompts, engine.generate(prompts, GenerationParams(max_new_tokens=10)), strict=True
    ):
        expected = plain_logprobs(engine, prompt + comp.token_ids)[0][len(prompt) - 1 :]
        assert comp.token_logprobs == pytest.approx(expected, abs=1e-4)
        assert comp.cumulative_logprob == pytest.approx(sum(expected), abs=1e-3)


def test_logprobs_are_raw_not_processed(gpt2_engine):
    """Temperature and repetition penalty change which token is picked, never the reported log-prob."""
    engine = gpt2_engine
    prompt = ids_of(engine, PROMPTS)[:1]
    comp = engine.generate(
        prompt, GenerationParams(max_new_tokens=6, temperature=0.3, repetition_penalty=2.0), [1]
    )[0]
    expected = plain_logprobs(engine, prompt[0] + comp.token_ids)[0][len(prompt[0]) - 1 :]
    assert comp.token_logprobs == pytest.approx(expected, abs=1e-4)


def test_sampling_is_seeded_per_row_not_per_batch(gpt2_engine):
    engine = gpt2_engine
    prompts = ids_of(engine, PROMPTS)
    params = GenerationParams(max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.95)
    seeds = [11, 22, 33, 44, 55, 66]
    first = engine.generate(prompts, params, seeds)
    again = engine.generate(prompts, params, seeds)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    single = [engine.generate([p], params, [s])[0] for p, s in zip(prompts, seeds, strict=True)]
    assert_same_completions(first, single)
    other = engine.generate(prompts, params, [s + 1 for s in seeds])
    assert [c.token_ids for c in other] != [c.token_ids for c in first]


def test_top_k_one_sampling_is_greedy(gpt2_engine):
    prompts = ids_of(gpt2_engine, PROMPTS)
    greedy = gpt2_engine.generate(prompts, GenerationParams(max_new_tokens=8))
    sampled = gpt2_engine.generate(prompts, GenerationParams(max_new_tokens=8, top_k=1), list(range(6)))
    assert [c.token_ids for c in sampled] == [c.token_ids for c in greedy]


def test_stop_string_cuts_text_and_names_the_string(gpt2_engine):
    engine = gpt2_engine
    prompts = ids_of(engine, PROMPTS)
    free = engine.generate(prompts, GenerationParams(max_new_tokens=16))
    # A stop string taken from the middle of row 0's own greedy text, so it is sure to occur.
    text0 = free[0].text
    stop = text0[len(text0) // 2 : len(text0) // 2 + 2]
    assert stop.strip(), f"pick another slice of {text0!r}"
    params = GenerationParams(max_new_tokens=16, stop=[stop])
    stopped = engine.generate(prompts, params)
    c = stopped[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text0[: text0.index(stop)]
    assert c.token_ids == free[0].token_ids[: len(c.token_ids)] and len(c.token_ids) < 16
    # The other rows are unaffected by row 0 leaving the batch early, and match one-at-a-time runs.
    assert_same_completions(stopped, [engine.generate([p], params)[0] for p in prompts])
    for free_c, stop_c in zip(free, stopped, strict=True):
        if stop_c.stop_reason is None:
            assert stop_c.token_ids == free_c.token_ids and stop_c.finish_reason == "length"


def test_eos_ends_a_row_and_min_new_tokens_holds_it_back(tiny_gpt2):
    from runner.engine import Engine

    engine = Engine(tiny_gpt2)
    prompts = ids_of(engine, PROMPTS)
    free = engine.generate(prompts, GenerationParams(max_new_tokens=8))
    # Make row 0's third greedy token an EOS token of this engine, as if the model had chosen to stop.
    eos = free[0].token_ids[2]
    engine.eos_ids = [*engine.eos_ids, eos]
    engine._eos = torch.tensor(engine.eos_ids, device=engine.device)
    out = engine.generate(prompts, GenerationParams(max_new_tokens=8))
    assert out[0].token_ids == free[0].token_ids[:3]  # the EOS token is kept in token_ids...
    assert out[0].finish_reason == "stop" and out[0].stop_reason is None
    assert len(out[0].token_logprobs) == 3 and out[0].token_logprobs == pytest.approx(
        free[0].token_logprobs[:3], abs=1e-5
    )
    held = engine.generate(prompts[:1], GenerationParams(max_new_tokens=8, min_new_tokens=5))[0]
    assert len(held.token_ids) >= 5 and eos not in held.token_ids[:5]


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 1e-6}])
def test_min_new_tokens_holds_eos_back_before_the_top_k_top_p_cut(tiny_gpt2, cut):
    """EOS was held back after top-k/top-p had cut the vocabulary: where EOS was the whole kept set nothing was
    left, and an arbitrary token was drawn (adversarial pass 42). Held back first, as transformers'
    MinNewTokensLengthLogitsProcessor and vLLM do, top_k=1 and a tiny top_p pick the greedy token."""
    from runner.engine import Engine

    engine = Engine(tiny_gpt2)
    prompts = ids_of(engine, PROMPTS)
    free = engine.generate(prompts, GenerationParams(max_new_tokens=4))
    # every row's greedy first token is an EOS token of this engine: the most likely token, held back
    engine.eos_ids = [*engine.eos_ids, *sorted({c.token_ids[0] for c in free})]
    engine._eos = torch.tensor(engine.eos_ids, device=engine.device)
    greedy = engine.generate(prompts, GenerationParams(max_new_tokens=4, min_new_tokens=4))
    assert all(c.token_ids[0] != f.token_ids[0] for c, f in zip(greedy, free, strict=True))
    params = GenerationParams(max_new_tokens=4, min_new_tokens=4, do_sample=True, **cut)
    sampled = engine.generate(prompts, params, seeds=list(range(len(prompts))))
    assert [c.token_ids for c in sampled] == [c.token_ids for c in greedy]
    assert_same_completions(sampled, greedy)


def test_length_finish_and_padding_equal_to_eos(gpt2_engine):
    """GPT-2 pads with its EOS id; padding must never be read as a finished row."""
    engine = gpt2_engine
    assert engine.tokenizer.pad_token is None and engine.pad_id == engine.eos_ids[0]
    out = engine.generate(ids_of(engine, PROMPTS), GenerationParams(max_new_tokens=5))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 5 for c in out if c.stop_reason is None)


def test_sentencepiece_keeps_the_leading_space(llama_engine):
    engine = llama_engine
    prompt = encode(engine.tokenizer, "The old man said", chat=False)
    c = engine.generate([prompt], GenerationParams(max_new_tokens=6))[0]
    whole = engine.tokenizer.decode(prompt + c.token_ids, skip_special_tokens=True)
    assert (
        whole.endswith(c.text) and whole == engine.tokenizer.decode(prompt, skip_special_tokens=True) + c.text
    )


def test_plan_batches_respects_size_and_token_budget():
    lengths = [5, 50, 7, 48, 6, 49, 3]
    plan = plan_batches(lengths, batch_size=3, max_batch_tokens=150, max_new_tokens=10)
    assert sorted(i for b in plan for i in b) == list(range(7))
    for b in plan:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 10) <= 150
    assert plan[0] == [1, 5]  # longest first; a third ~50-token row would make 180 > 150 tokens
    assert plan == plan_batches(lengths, 3, 150, 10)  # deterministic
    assert plan_batches([500], 4, 10, 10) == [[0]]  # a row over the budget still runs, alone


def test_left_pad_shapes():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and not math.isnan(float(ids.sum()))


def test_top_logprobs_include_the_chosen_token_and_match_the_distribution(gpt2_engine):
    engine = gpt2_engine
    prompts = ids_of(engine, PROMPTS)[:3]
    params = GenerationParams(max_new_tokens=5, temperature=1.5, logprobs=3)
    out = engine.generate(prompts, params, [1, 2, 3])
    for prompt, c in zip(prompts, out, strict=True):
        full = torch.tensor([prompt + c.token_ids], device=engine.device)
        with torch.no_grad():
            lp = torch.log_softmax(engine.model(full).logits[0].float(), -1)
        assert len(c.top_logprobs) == len(c.token_ids)
        for t, (tok, step) in enumerate(zip(c.token_ids, c.top_logprobs, strict=True)):
            dist = lp[len(prompt) - 1 + t]
            best = dist.topk(3)
            assert [e[0] for e in step[:3]] == best.indices.tolist() and [e[2] for e in step[:3]] == [1, 2, 3]
            assert [e[1] for e in step[:3]] == pytest.approx(best.values.tolist(), abs=1e-4)
            chosen = [e for e in step if e[0] == tok]
            assert len(chosen) == 1 and chosen[0][2] == int((dist > dist[tok]).sum()) + 1
            assert len(step) == (3 if tok in best.indices.tolist() else 4)
    assert any(
        len(step) == 4 for c in out for step in c.top_logprobs
    )  # sampling picked outside the top 3 at least once
    no_alternatives = engine.generate(prompts, GenerationParams(max_new_tokens=5, logprobs=0))
    assert all(len(step) == 1 and step[0][2] >= 1 for c in no_alternatives for step in c.top_logprobs)


def test_prompt_logprobs_match_a_forward_pass_and_do_not_change_generation(gpt2_engine, monkeypatch):
    """... and take no log-softmax of the whole [batch, prompt, vocab] logits: a chunk of positions at a time."""
    engine = gpt2_engine
    prompts = ids_of(engine, PROMPTS)
    plain = engine.generate(prompts, GenerationParams(max_new_tokens=4))
    whole = torch.log_softmax

    def not_of_every_position(x, *args, **kwargs):
        assert x.dim() < 3 or x.shape[1] == 1, f"a log-softmax of {tuple(x.shape)} logits at once"
        return whole(x, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", not_of_every_position)
    with_prompt = engine.generate(prompts, GenerationParams(max_new_tokens=4, prompt_logprobs=True))
    monkeypatch.undo()
    assert [c.token_ids for c in with_prompt] == [c.token_ids for c in plain]
    for prompt, c in zip(prompts, with_prompt, strict=True):
        expected = plain_logprobs(engine, prompt)[0]
        assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(prompt)
        assert c.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_prompt_logprobs_of_one_token_prompts(gpt2_engine):
    """A prefill whose prompts are all one token long has no prompt token to score: [None] each (the chunked
    gather had no chunk to join; found by review)."""
    one = [[5], [6]]
    params = GenerationParams(max_new_tokens=2, prompt_logprobs=True)
    assert [c.prompt_logprobs for c in gpt2_engine.generate(one, params)] == [[None], [None]]
    assert [c.prompt_logprobs for c in gpt2_engine.generate(one[:1], params)] == [[None]]


def test_gpu_token_budgets_from_free_memory_for_generation_and_for_scoring(monkeypatch):
    """On a GPU the token budget is what half the free memory holds: the KV cache per token for generation,
    one layer's activations per token for scoring (whose logits are chunked, so the vocabulary is not
    counted); faked here with a made-up free-memory figure."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from runner import batching

    cfg = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152)  # fmt: skip  # SmolLM2-135M's shape
    free = 40 * 2**30
    kv = 2 * 30 * 3 * 64 * 2  # bytes per token in bfloat16
    assert batching.tokens_in_memory(cfg, torch.bfloat16, free, "generate") == int(0.5 * free / kv)
    act = (6 * 576 + 3 * 1536) * 4
    assert batching.tokens_in_memory(cfg, torch.float32, free, "score") == int(0.5 * free / act)
    assert batching.tokens_in_memory(cfg, torch.float32, 1000, "score") == batching.MIN_BATCH_TOKENS

    # the first reading, then less and less free: what the caching allocator keeps between batches
    readings = iter([free + 5 * 2**20, free - 3 * 2**30, free - 6 * 2**30])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (next(readings), 80 * 2**30))
    gpu = SimpleNamespace(
        device=torch.device("cuda"), model=SimpleNamespace(config=cfg), dtype=torch.bfloat16
    )
    assert batching.default_batch_tokens(gpu, "generate") == int(0.5 * free / kv)
    assert batching.default_batch_tokens(gpu, "embed") == int(0.5 * free / (act // 2))
    assert batching.default_batch_tokens(gpu, "generate") == int(0.5 * free / kv)  # the same every unit
    # the row count: vLLM's offline defaults, 1,024 on a GPU of >= 70 GiB (an H200), 256 below (a T4)
    for total, rows in ((143771 * 2**20, 1024), (80 * 2**30, 1024), (40 * 2**30, 256), (15 * 2**30, 256)):
        props = SimpleNamespace(total_memory=total)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, props=props: props)
        assert batching.default_batch_size(gpu) == rows
        assert batching.default_batch_size(gpu, 8) == 8
    cpu = SimpleNamespace(device=torch.device("cpu"), model=gpu.model, dtype=torch.float32)
    assert batching.default_batch_tokens(cpu, "score") == batching.CPU_BATCH_TOKENS
    assert batching.default_batch_size(cpu, 8) == 8


@cpu_only
def test_device_map_loads_through_accelerate_and_changes_nothing(tiny_llama, llama_engine, monkeypatch):
    """--device-map (accelerate's placement, for a model larger than one GPU) on a CPU-only machine puts every
    layer on the CPU: the model is loaded with the map, and generation and scoring equal the plain engine."""
    from transformers import AutoModelForCausalLM

    from runner.engine import Engine
    from runner.params import EngineOptions, ParamError
    from runner.scoring import score_batch

    maps = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: maps.append(kw.get("device_map")) or real(*a, **kw))  # fmt: skip
    engine = Engine(tiny_llama, EngineOptions(device_map="auto"))
    assert maps == ["auto"] and engine.device.type == "cpu"
    # --device cpu keeps every layer on the CPU, on a machine with a GPU too (the map alone would use it)
    assert Engine(tiny_llama, EngineOptions(device="cpu", device_map="auto")).device.type == "cpu"
    assert maps[1] == {"": "cpu"}
    prompts = ids_of(llama_engine, PROMPTS)
    params = GenerationParams(max_new_tokens=6)
    assert_same_completions(engine.generate(prompts, params), llama_engine.generate(prompts, params))
    a, b = (
        score_batch(engine, prompts, [1] * len(prompts)),
        score_batch(llama_engine, prompts, [1] * len(prompts)),
    )
    for x, y in zip(a, b, strict=True):
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=1e-5)
    with pytest.raises(ParamError, match="device_map must be one of auto, balanced"):
        EngineOptions(device_map="everywhere")


@pytest.mark.parametrize("sampled", [False, True])
def test_a_decode_step_waits_for_the_device_once(gpt2_engine, monkeypatch, sampled):
    """Each host read of a GPU tensor (`.tolist()`, `bool()`, `.any()`...) waits for the GPU to finish: a step
    reads its tokens, log-probs and EOS flags in one copy, and decides which processors run from the settings
    kept on the host (it waited six times a step, ten when sampling)."""
    import collections
    import sys

    reads = collections.Counter()
    for name in ("tolist", "item", "__bool__", "nonzero", "any", "all"):
        real = getattr(torch.Tensor, name)

        def read(self, *args, real=real, name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}runner{os.sep}" in caller:
                reads[name, os.path.basename(caller)] += 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    prompts = ids_of(gpt2_engine, PROMPTS)[:3]
    settings = {"do_sample": True, "temperature": 0.8, "top_k": 20} if sampled else {}
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12, **settings)
    gpt2_engine.generate(prompts, params, seeds=[1, 2, 3])
    assert sum(reads.values()) == 12, reads  # one per step


def test_a_decode_step_reads_the_texts_of_all_rows_with_stop_strings_in_one_decode(gpt2_engine, monkeypatch):
    import runner.engine as engine_module

    engine = gpt2_engine
    prompts = ids_of(engine, PROMPTS)
    params = GenerationParams(max_new_tokens=8, stop=["\x00never"])
    before = engine.generate(prompts, params)
    calls = []
    real = engine_module.decode_many
    monkeypatch.setattr(
        engine_module, "decode_many", lambda tok, rows: calls.append(len(rows)) or real(tok, rows)
    )
    after = engine.generate(prompts, params)
    assert_same_completions(after, before)
    # per step, then for the results: the prompts' last tokens, then with the text, of all rows at once
    steps = max(len(c.token_ids) for c in after)
    assert len(calls) == 2 * steps + 2 and calls[:2] == calls[-2:] == [len(prompts)] * 2
