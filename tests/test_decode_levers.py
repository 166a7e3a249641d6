"""The CPU decode levers: attention per length group (kvcache.GroupedCache) and oneDNN for small matmuls
(kernels.py). Each must be in use where it applies, and change nothing a row gets."""

import os
from types import SimpleNamespace

import pytest
import torch
from helpers import LONG_PROMPTS, assert_same_completions, cpu_only, ids_of
from transformers.pytorch_utils import Conv1D

from runner import GenerationParams, kernels, kvcache
from runner import engine as engine_mod

PROMPTS = LONG_PROMPTS


@pytest.fixture
def spy_groups(monkeypatch):
    """Records the group sizes of every grouped cache the engine builds."""
    seen: list[list[int]] = []
    real = kvcache.grouped

    def spy(caches, pads):
        seen.append([len(p) for p in pads])
        return real(caches, pads)

    monkeypatch.setattr(kvcache, "grouped", spy)
    return seen


@cpu_only
@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_grouped_decode_is_used_and_equals_one_at_a_time(request, spy_groups, engine_name):
    engine = request.getfixturevalue(engine_name)
    assert engine._grouped and engine.model.config._attn_implementation == kvcache.ATTENTION
    prompts = ids_of(engine, PROMPTS)
    params = GenerationParams(max_new_tokens=10, repetition_penalty=1.2)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert not spy_groups  # one row: one group, no grouped cache
    batched = engine.generate(prompts, params)
    assert len(spy_groups) == 1 and len(spy_groups[0]) > 1 and sum(spy_groups[0]) == len(prompts)
    assert_same_completions(batched, single)


@cpu_only
@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_rows_leaving_a_grouped_batch_at_different_steps(request, monkeypatch, spy_groups, engine_name):
    """Rows end at different steps (EOS), emptying whole groups and thinning others: the rest are unaffected."""
    engine = request.getfixturevalue(engine_name)
    monkeypatch.setattr(engine, "decode_groups", 100)
    monkeypatch.setattr(engine_mod, "PREFILL_MIN_FILL", 1.0)  # a group per distinct length
    prompts = ids_of(engine, PROMPTS)
    params = GenerationParams(max_new_tokens=9)
    free = engine.generate(prompts, params)
    # Make some rows' k-th greedy token an EOS token, k different per row, as if the model chose to stop there.
    extra = {c.token_ids[k] for c, k in zip(free, [1, 3, 5, 2, 6], strict=False)}
    monkeypatch.setattr(engine, "eos_ids", [*engine.eos_ids, *sorted(extra)])
    monkeypatch.setattr(engine, "_eos", torch.tensor(engine.eos_ids, device=engine.device))
    spy_groups.clear()
    out = engine.generate(prompts, params)
    assert len(spy_groups[0]) == len({len(p) for p in prompts}) > 3
    assert len({len(c.token_ids) for c in out}) > 2  # rows really ended at different steps
    assert_same_completions(out, [engine.generate([p], params)[0] for p in prompts])


@cpu_only
def test_a_model_that_bypasses_grouped_attention_falls_back(tiny_gpt2):
    """If some layer does not call the grouped attention (custom model code), the batch is decoded again with
    one merged cache, and the engine stops grouping: nothing wrong reaches the caller."""
    engine = engine_mod.Engine(tiny_gpt2)
    prompts = ids_of(engine, PROMPTS)
    params = GenerationParams(max_new_tokens=8)
    single = [engine.generate([p], params)[0] for p in prompts]
    engine.model.set_attn_implementation("sdpa")  # attention no longer goes through runner's function
    assert engine._grouped
    out = engine.generate(prompts, params)
    assert not engine._grouped
    assert_same_completions(out, single)


def test_grouped_cache_select_keeps_rows_and_drops_empty_groups():
    cls = kvcache.growing_layer_class()

    def group(rows, length, base):
        k = torch.arange(rows * length, dtype=torch.float32).view(rows, 1, length, 1) + base
        return k, k + 0.5

    caches = []
    for rows, length, base in ((2, 4, 0.0), (1, 3, 100.0), (3, 2, 200.0)):
        k, v = group(rows, length, base)
        caches.append(SimpleNamespace(layers=[cls(k.clone(), v.clone(), length)]))
    cache = kvcache.grouped(caches, [[0, 1], [0], [0, 0, 1]])
    assert cache.bounds == [(0, 2), (2, 3), (3, 6)] and cache.get_seq_length() == 4
    cache.batch_select_indices(torch.tensor([1, 3, 5]))  # group 1 (slot 2) empties
    assert cache.bounds == [(0, 1), (1, 3)]
    sub0, sub2 = cache.layers[0].subs
    assert torch.equal(sub0.keys, group(2, 4, 0.0)[0][1:])
    assert torch.equal(sub2.keys, group(3, 2, 200.0)[0][[0, 2]])
    assert [p.tolist() for p in cache.pads] == [[1], [0, 1]]
    assert cache.mask(1, 2)[:, 0, 0].tolist() == [[True, True], [False, True]]


def test_rows_are_selected_in_each_layers_own_cache_on_its_own_device():
    """device_map spreads the layers (and their caches) over GPUs: indexing a cache on cuda:1 with row indices on
    cuda:0 fails, so every layer gets the rows on its own device ("meta" stands in for a second GPU here)."""
    got = []

    class Layer(SimpleNamespace):
        def batch_select_indices(self, indices):
            got.append(
                (self.device, indices.device, indices.tolist() if indices.device.type == "cpu" else None)
            )

    cache = SimpleNamespace(layers=[Layer(device=torch.device("cpu")), Layer(device=torch.device("meta"))])
    kvcache.select_rows(cache, torch.tensor([0, 2]))
    assert [(str(a), str(b)) for a, b, _ in got] == [("cpu", "cpu"), ("meta", "meta")]
    assert got[0][2] == [0, 2]
    k = torch.arange(12.0).view(3, 1, 4, 1)
    layer = kvcache.growing_layer_class()(k.clone(), k + 0.5, 4)
    kvcache.select_rows(SimpleNamespace(layers=[layer]), torch.tensor([2, 0]))
    assert torch.equal(layer.keys, k[[2, 0]]) and torch.equal(layer.values, k[[2, 0]] + 0.5)


def test_merging_caches_frees_each_layer_of_the_parts_as_it_goes():
    """A refill merges the running batch's cache (still held by the decode state) with the joiners': each part's
    layer is freed once copied, so the merge takes one layer more than the merged cache, not twice it."""
    import weakref

    cls = kvcache.growing_layer_class()

    def part(rows, length):
        layers = []
        for _ in range(3):
            k = torch.randn(rows, 2, length + 4, 8)
            layers.append(cls(k, k + 1, length))
        return SimpleNamespace(layers=layers)

    running, joiners = part(3, 6), part(2, 4)
    buffers = [
        weakref.ref(t) for c in (running, joiners) for layer in c.layers for t in (layer.buf_k, layer.buf_v)
    ]
    merged = kvcache.merge_prefills([running, joiners], extra=5)
    assert merged.get_seq_length() == 6 and merged.layers[0].keys.shape[0] == 5
    assert all(ref() is None for ref in buffers), "a part's buffer outlived its merge"


@pytest.mark.parametrize("most", [1, 2, 3, 5])
def test_decode_groups_cover_every_row_and_merge_the_cheapest_neighbours(most):
    lengths = [3, 200, 40, 41, 199, 5, 4, 120, 1, 60]
    free = engine_mod.decode_groups(lengths, 100)
    assert free == engine_mod.prefill_groups(lengths, 10**9)
    groups = engine_mod.decode_groups(lengths, most)
    assert len(groups) == min(most, len(free))
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)
    # Free groups {200,199} {120} {60} {41,40} {5,4,3} {1}. Merging adds (rows of the shorter) x (width gap)
    # padded slots: {5,4,3}+{1} 4, then {60}+{41,40} 38, then {200,199}+{120} 80 (cheaper than 180 or 220).
    if most == 3:
        assert [sorted(lengths[i] for i in g) for g in groups] == [
            [120, 199, 200],
            [40, 41, 60],
            [1, 3, 4, 5],
        ]


# ------------------------------------------------------------------------------------------------------------
# oneDNN linear
# ------------------------------------------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not kernels.available(), reason="this torch has no usable oneDNN linear")


def _three_layers(dtype=torch.float32):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8, bias=False), Conv1D(12, 8))
    return layers.to(dtype)


# bfloat16 goes to oneDNN only where oneDNN takes it (kernels.dtypes: AVX-512 and newer), as on the dev machine
native_bf16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(torch.bfloat16 not in kernels.dtypes(), reason="oneDNN takes no bf16 here"),
)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, native_bf16])
@pytest.mark.parametrize("pack", [False, True])
def test_onednn_layers_compute_what_the_layers_compute(monkeypatch, pack, dtype):
    """Unpacked: small calls to oneDNN, big ones to the layer's own forward. Packed: every call to oneDNN on the
    packed copy. Either way the same numbers, and with gradients on the layers' own differentiable forward; in
    float32 for an input upcast by Engine.in_float32 (the packed copy is bfloat16: the layers' own forward)."""
    model = _three_layers(dtype)
    x_small = torch.randn(5, 1, 16, dtype=dtype)
    x_big = torch.randn(kernels.SMALL_ROWS + 1, 16, dtype=dtype)
    with torch.inference_mode():
        want = [model(x_small), model(x_big)]
    calls = []
    real = kernels._onednn
    monkeypatch.setattr(
        kernels, "_onednn", lambda x, w, b: calls.append((x.shape[0], w.is_mkldnn)) or real(x, w, b)
    )
    assert kernels.install(model, pack=pack) == {
        "onednn_linear": 3,
        "onednn_packed": 3 * pack,
        "fused_gelu": 0,
    }
    calls.clear()  # install's own probes
    with torch.inference_mode():
        got = [model(x_small), model(x_big)]
    big = kernels.SMALL_ROWS + 1
    assert calls == ([(5, True)] * 3 + [(big, True)] * 3 if pack else [(5, False)] * 3)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5 if dtype == torch.float32 else 2e-2)
    calls.clear()
    out = model(x_small)  # with gradients on: the layers' own forward, differentiable
    assert out.requires_grad and calls == []
    if dtype != torch.float32:
        _check_upcast(model, x_small, calls)
    kernels.uninstall(model)


@needs_onednn
@pytest.mark.parametrize("pack", [False, True])
def test_onednn_layers_moved_off_the_cpu_after_install_run_their_own_forward(monkeypatch, pack):
    """A model moved to another device after install (a GPU; here `meta`, which any CPU has): oneDNN takes CPU
    tensors only, and only CUDA inputs were kept from it (a small call on an XPU or MPS model went to oneDNN)."""
    model = _three_layers()
    kernels.install(model, pack=pack)
    calls = []
    monkeypatch.setattr(kernels, "_onednn", lambda *a: calls.append(a))
    model.to("meta")
    with torch.inference_mode():
        out = model(torch.randn(5, 1, 16, device="meta"))
    assert out.device.type == "meta" and out.shape == (5, 1, 12) and calls == []
    kernels.uninstall(model)


def _check_upcast(model, x, calls):
    """Weights upcast in place as Engine.in_float32 does: float32 in, float32 out through oneDNN on the weight in
    place, never the bf16 packed copy, the numbers of the stock float32 layers."""
    with torch.inference_mode():
        for p in model.parameters():
            p.data = p.data.float()
        calls.clear()
        upcast = model(x.float())
        stock = [type(m).forward(m, y) for m, y in _inputs_of(model, x.float())]
    assert calls == [(x.shape[0], False)] * 3
    assert upcast.dtype == torch.float32 and torch.allclose(upcast, stock[-1], atol=1e-5)


def _inputs_of(model, x):
    """(layer, its input) along `model` (a Sequential), each layer's input its stock output before it."""
    pairs = []
    for m in model:
        pairs.append((m, x))
        x = type(m).forward(m, x)
    return pairs
    assert all("forward" not in m.__dict__ and kernels.PACKED not in m.__dict__ for m in model)


@needs_onednn
def test_layers_are_packed_only_while_memory_keeps_twice_their_size_to_spare(monkeypatch):
    model = _three_layers()
    sizes = [m.weight.numel() * 4 for m in model]  # 16*32, 32*8 and 12*8 float32
    monkeypatch.setattr(kernels, "_available_memory", lambda: 2 * (sizes[0] + sizes[1]))
    assert kernels.install(model)["onednn_packed"] == 2
    assert [kernels.PACKED in m.__dict__ for m in model] == [True, True, False]
    kernels.uninstall(model)
    monkeypatch.setattr(kernels, "_available_memory", lambda: 0)  # unknown: nothing packed, oneDNN still used
    assert kernels.install(model) == {"onednn_linear": 3, "onednn_packed": 0, "fused_gelu": 0}
    kernels.uninstall(model)


@needs_onednn
@pytest.mark.skipif(torch.bfloat16 not in kernels.dtypes(), reason="oneDNN takes no bf16 here")
@pytest.mark.parametrize("spare", [1.0, 1.5, 2.0, 3.0])
def test_bf16_packed_copies_leave_the_float32_retry_its_room(monkeypatch, spare):
    """Engine.in_float32 (a row non-finite in bfloat16, retried) upcasts every weight: 2 bytes more per element.
    The packed copies come out of what is left after that, so a retry that fits unpacked still fits packed."""
    model = _three_layers(torch.bfloat16)
    upcast = sum(p.numel() * 2 for p in model.parameters())
    monkeypatch.setattr(kernels, "_available_memory", lambda: int(spare * upcast))
    kernels.install(model)
    packed = sum(m.weight.numel() * 2 for m in model if kernels.PACKED in m.__dict__)
    assert spare * upcast - packed >= upcast and (packed > 0 or spare < 3)
    kernels.uninstall(model)


@cpu_only
@needs_onednn
def test_engine_on_cpu_uses_onednn_and_stays_exact(gpt2_engine, monkeypatch):
    engine = gpt2_engine
    assert (
        engine.kernels["onednn_linear"] > 0
        and engine.kernels["onednn_packed"] == engine.kernels["onednn_linear"]
    )
    prompts = ids_of(engine, PROMPTS)
    params = GenerationParams(max_new_tokens=8)
    with_onednn = engine.generate(prompts, params)
    kernels.uninstall(engine.model, ("onednn_linear",))
    try:
        without = engine.generate(prompts, params)
    finally:
        kernels.install(engine.model)
    assert_same_completions(with_onednn, without)


def test_gpt2_gelu_is_fused_and_computes_gelu_new(gpt2_engine):
    from transformers.activations import NewGELUActivation

    engine = gpt2_engine
    assert engine.kernels["fused_gelu"] == engine.model.config.n_layer
    act = next(m for m in engine.model.modules() if type(m) is NewGELUActivation)
    x = torch.linspace(-8, 8, 4001)
    with torch.inference_mode():
        fused = act(x)
        kernels.uninstall(engine.model, ("fused_gelu",))
        try:
            stock = act(x)
        finally:
            kernels.install(engine.model)
    assert torch.allclose(fused, stock, atol=1e-6) and not torch.equal(act.forward(x), x)


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
@pytest.mark.parametrize("max_active", [None, 3])
def test_samples_of_one_prompt_share_its_prompt_pass(request, monkeypatch, engine_name, max_active):
    """The n samples of a row (and any rows with the same prompt) run one prompt pass between them: the prompt
    pass sees each distinct prompt once per batch it joins, and every sample equals that sample generated alone,
    with the refilled batch (max_active) too."""
    engine = request.getfixturevalue(engine_name)
    distinct = ids_of(engine, PROMPTS)
    rows = [r for r in range(len(distinct)) for _ in range(3)]  # n = 3, the samples of a row side by side
    prompts = [distinct[r] for r in rows]
    params = GenerationParams(max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.95)
    seeds = [1000 + i for i in range(len(prompts))]
    prefilled: list[int] = []  # rows of each prompt pass
    real_forward = engine._forward

    def spy(input_ids, *args, **kwargs):
        if input_ids.shape[1] > 1:
            prefilled.append(input_ids.shape[0])
        return real_forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward", spy)
    single = [engine.generate([p], params, [s])[0] for p, s in zip(prompts, seeds, strict=True)]
    prefilled.clear()
    shared = engine.generate(prompts, params, seeds, max_active=max_active)
    assert_same_completions(shared, single)
    assert len({tuple(c.token_ids) for c in shared}) > len(distinct)  # the samples of a row really differ
    if max_active is None:
        assert sum(prefilled) == len(distinct)
    else:
        assert sum(prefilled) < len(prompts)
    monkeypatch.setattr(engine, "share_prompts", False)
    monkeypatch.setattr(engine, "share_prefix", False)  # else the copies share all but their last token
    prefilled.clear()
    assert_same_completions(engine.generate(prompts, params, seeds, max_active=max_active), single)
    assert sum(prefilled) == len(prompts)


@pytest.mark.parametrize("max_active", [None, 2])
def test_greedy_twins_are_computed_once(gpt2_engine, monkeypatch, max_active):
    """A greedy row's n samples, and a prompt given twice with the same settings, are one computation: the
    batch decodes each once, every twin gets its own copy equal to what it gets alone, and each is reported
    finished. Rows that sample, or whose settings differ, are computed on their own."""
    engine = gpt2_engine
    a, b = ids_of(engine, PROMPTS[:2])
    greedy = GenerationParams(max_new_tokens=5, logprobs=2)
    longer = GenerationParams(max_new_tokens=7, logprobs=2)
    sampled = GenerationParams(max_new_tokens=5, do_sample=True, temperature=0.9)
    prompts = [a, a, b, a, a, b, a]
    params = [greedy, greedy, greedy, longer, greedy, greedy, sampled]
    seeds = list(range(len(prompts)))
    single = [engine.generate([p], [q], [s])[0] for p, q, s in zip(prompts, params, seeds, strict=True)]
    rows_decoded: list[int] = []
    real_forward = engine._forward

    def spy(input_ids, *args, **kwargs):
        rows_decoded.append(input_ids.shape[0])
        return real_forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward", spy)
    finished: list[int] = []
    outs = engine.generate(
        prompts, params, seeds, max_active=max_active, on_finish=lambda r, t: finished.append(r)
    )
    assert_same_completions(outs, single)
    assert sorted(finished) == list(range(len(prompts)))
    # a-greedy, b-greedy, a-longer, sampled
    assert max(rows_decoded) <= (4 if max_active is None else max_active)
    assert outs[0] is not outs[1] and outs[0].token_ids is not outs[1].token_ids  # each twin its own copy


def test_twins_are_rows_whose_settings_read_the_same_not_only_compare_equal():
    """Schemas whose keys come in another order, or `true` for `1`, compare equal as Python dicts but are other
    settings (another key order is generated, `1` does not satisfy `{"const": true}`): never twins (pass 52)."""
    from runner.engine import _greedy_twins

    def row(schema):
        return GenerationParams(max_new_tokens=8, json_schema=schema)

    ab = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    ba = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}}
    params = [
        row(ab),
        row(ba),
        row({"const": True}),
        row({"const": 1}),
        row({"enum": [False]}),
        row({"enum": [0]}),
    ]
    assert params[0] == params[1] and params[2] == params[3]  # (what dict equality says)
    assert _greedy_twins([[1, 2]] * 6, params) == {r: [r] for r in range(6)}
    again = [row(ab), row(dict(ab))]
    assert _greedy_twins([[1, 2]] * 2, again) == {0: [0, 1]}  # the same text: twins


# A start every prompt shares, as a chat template's system prompt or a few-shot instruction gives
SHARED_START = (
    "Answer in one short sentence and do not repeat the question. Be kind, be brief and be exact.\n"
)


def _prompt_passes(
    monkeypatch, engine, drop_positions_with_cache: bool = False
) -> list[tuple[int, int, bool]]:
    """Spy on the engine's forward passes: (rows, input tokens, after a cache) of every prompt pass. With
    `drop_positions_with_cache`, a pass that continues a cache gets no position ids, as a model whose forward
    counts positions from its cache would compute them."""
    passes: list[tuple[int, int, bool]] = []
    real_forward = engine._forward

    def spy(input_ids, attention_mask, position_ids, cache, last_only):
        if input_ids.shape[1] > 1:
            passes.append((input_ids.shape[0], input_ids.shape[1], cache is not None))
            if drop_positions_with_cache and cache is not None:
                position_ids = None
        return real_forward(input_ids, attention_mask, position_ids, cache, last_only)

    monkeypatch.setattr(engine, "_forward", spy)
    monkeypatch.setattr(engine, "_prefix_memo", None)
    return passes


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_a_batchs_numbers_do_not_depend_on_the_batches_before_it(request, monkeypatch, engine_name):
    """A resumed run does not run the batches before the one it resumes at: a batch must compute the same
    numbers whatever ran before it in this process. The shared start of one batch was kept for the next one,
    whose only prompt (the samples of one row) then ran after it instead of whole: log-probs off by ~5e-7
    after a resume (adversarial pass 18)."""
    engine = request.getfixturevalue(engine_name)
    monkeypatch.setattr(engine, "_prefix_checked", True)
    before = ids_of(engine, [SHARED_START + p for p in PROMPTS[:2]])
    batch = ids_of(engine, [SHARED_START + PROMPTS[2]] * 2)  # two samples of one row
    params = GenerationParams(max_new_tokens=4, do_sample=True, temperature=0.9, logprobs=2)
    monkeypatch.setattr(engine, "_prefix_memo", None)
    fresh = engine.generate(batch, params, [7, 8])  # as a resumed worker's first batch
    engine.generate(before, params, [5, 6])  # a batch whose prompts share the start
    after = engine.generate(batch, params, [7, 8])  # as the uninterrupted run's next batch
    assert [c.token_logprobs for c in after] == [c.token_logprobs for c in fresh]  # exactly
    assert [c.top_logprobs for c in after] == [c.top_logprobs for c in fresh]


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
@pytest.mark.parametrize("max_active", [None, 3])
def test_a_shared_prompt_start_is_prefilled_once(request, monkeypatch, engine_name, max_active):
    """The start all prompts share is prefilled once (and kept for the rows that join later), each row's own
    tokens after it; every row equals itself generated alone, samples of a row included."""
    engine = request.getfixturevalue(engine_name)
    monkeypatch.setattr(engine, "_prefix_checked", True)  # the check's own pass is tested below
    prompts = ids_of(engine, [SHARED_START + p for p in PROMPTS for _ in range(2)])
    start = len(os.path.commonprefix(prompts))
    assert start >= engine_mod.SHARED_PREFIX_MIN
    params = GenerationParams(max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.95)
    seeds = [2000 + i for i in range(len(prompts))]
    single = [engine.generate([p], params, [s])[0] for p, s in zip(prompts, seeds, strict=True)]
    passes = _prompt_passes(monkeypatch, engine)
    shared = engine.generate(prompts, params, seeds, max_active=max_active)
    assert_same_completions(shared, single)
    assert passes[0] == (1, start, False)  # the shared start, once
    assert all(cont and width <= max(map(len, prompts)) - start for _, width, cont in passes[1:])
    own = sum(rows for rows, _, _ in passes[1:])  # each distinct prompt once (refill: per batch it joins)
    assert own == len(PROMPTS) if max_active is None else own < len(prompts)
    assert engine.speedups["shared_prefix"]
    monkeypatch.setattr(engine, "share_prefix", False)
    passes.clear()
    assert_same_completions(engine.generate(prompts, params, seeds, max_active=max_active), single)
    assert not any(cont for _, _, cont in passes)


def test_no_shared_start_when_it_is_short_or_a_prompt_is_all_start(llama_engine, monkeypatch):
    """A start shorter than SHARED_PREFIX_MIN is not worth a pass of its own; a prompt that is nothing but the
    shared start keeps its last token as its own (its logits come from that position)."""
    monkeypatch.setattr(llama_engine, "_prefix_checked", True)
    params = GenerationParams(max_new_tokens=4)
    short = ids_of(llama_engine, ["The " + p for p in PROMPTS])
    passes = _prompt_passes(monkeypatch, llama_engine)
    llama_engine.generate(short, params)
    assert not any(cont for _, _, cont in passes)
    whole = ids_of(llama_engine, [SHARED_START.strip(), *(SHARED_START + p for p in PROMPTS)])
    start = len(os.path.commonprefix(whole))
    single = [llama_engine.generate([p], params)[0] for p in whole]
    passes.clear()
    monkeypatch.setattr(llama_engine, "_prefix_memo", None)
    assert_same_completions(llama_engine.generate(whole, params), single)
    assert passes[0] == (1, min(start, len(whole[0]) - 1), False)


def _before_the_check(request, monkeypatch, engine_name):
    """(engine, prompts with a shared start, params, each prompt generated alone) with the shared-start check
    not yet done, as in a fresh engine."""
    engine = request.getfixturevalue(engine_name)
    monkeypatch.setattr(engine, "_prefix_checked", False)
    monkeypatch.setattr(engine, "share_prefix", True)
    prompts = ids_of(engine, [SHARED_START + p for p in PROMPTS])
    params = GenerationParams(max_new_tokens=6)
    return engine, prompts, params, [engine.generate([p], params)[0] for p in prompts]


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_a_model_that_ignores_given_positions_is_caught_before_it_changes_a_row(
    request, monkeypatch, engine_name
):
    """A model whose forward counts positions from its cache instead of taking the engine's would place the
    padded rows' tokens wrong after a shared start: the first such batch is checked against a row alone,
    sharing is turned off for that engine, and every row is what it is alone."""
    engine, prompts, params, single = _before_the_check(request, monkeypatch, engine_name)
    _prompt_passes(monkeypatch, engine, drop_positions_with_cache=True)
    assert_same_completions(engine.generate(prompts, params), single)
    assert not engine.share_prefix and not engine.speedups["shared_prefix"]


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_the_check_passes_for_the_models_runner_supports(request, monkeypatch, engine_name):
    engine, prompts, params, single = _before_the_check(request, monkeypatch, engine_name)
    passes = _prompt_passes(monkeypatch, engine)
    assert_same_completions(engine.generate(prompts, params), single)
    assert engine._prefix_checked and engine.share_prefix
    assert passes[0][:2] == (1, len(os.path.commonprefix(prompts)))


def test_on_a_gpu_attention_leaves_out_cudnn_and_puts_torchs_choice_back():
    """cuDNN's attention builds a graph per new shape, which cost a GPU decode 3-9x (engine.GPU_ATTENTION):
    inside attention_kernels(cuda) every other kernel is allowed and cuDNN's is not, and after it torch's own
    flags are back. On CPU nothing changes."""
    flags = (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.flash_sdp_enabled,
             torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.math_sdp_enabled)  # fmt: skip
    before = [f() for f in flags]
    assert before[0], "torch allows cuDNN attention by default (else this test shows nothing)"
    with engine_mod.attention_kernels(torch.device("cuda:1")):
        assert [f() for f in flags] == [False, True, True, True]
    assert [f() for f in flags] == before
    with engine_mod.attention_kernels(torch.device("cpu")):
        assert [f() for f in flags] == before


def test_every_model_call_runs_inside_the_engines_attention_kernels(gpt2_engine, monkeypatch):
    """generate, transformers' generate (beams), score and embed run every module of the model inside
    Engine.computing, so none of them reaches cuDNN's attention on a GPU."""
    import contextlib

    from runner import scoring
    from runner.hf_generate import generate_with_transformers

    inside, calls_outside, calls_inside = [False], [], [0]

    @contextlib.contextmanager
    def spy(device):
        assert device == gpt2_engine.device
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    def watch(module, args):
        if inside[0]:
            calls_inside[0] += 1
        else:
            calls_outside.append(type(module).__name__)

    monkeypatch.setattr(engine_mod, "attention_kernels", spy)
    ids = ids_of(gpt2_engine, ["the old man said"])
    beams = GenerationParams(max_new_tokens=2, num_beams=2)
    runs = {
        "generate": lambda: gpt2_engine.generate(ids, GenerationParams(max_new_tokens=2)),
        "beams": lambda: generate_with_transformers(gpt2_engine, ids[0], beams, None),
        "score": lambda: scoring.score_batch(gpt2_engine, ids, [1]),
        "embed": lambda: scoring.embed_batch(gpt2_engine, ids),
    }
    hook = torch.nn.modules.module.register_module_forward_pre_hook(watch)
    try:
        for name, run in runs.items():
            calls_inside[0] = 0
            run()
            assert calls_inside[0] > 0 and not calls_outside, (name, calls_outside[:5])
    finally:
        hook.remove()
