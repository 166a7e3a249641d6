"""Ray Data stages as a user who already runs Ray meets them (adversarial pass 239): a checkpoint of one model and
settings finished by a script run again with others; OpenAI Batch rows. Fast: the pipelines are only built,
on the stand-in Dataset of tests/test_adv_model_changes.py (Ray's own plan is in tests/test_ray.py)."""

import functools
import shutil

import pytest
from test_adv_model_changes import _checkpointed

import runner
from runner import GenerationParams


def test_a_checkpoint_run_again_with_other_settings_or_another_model_is_refused(
    tmp_path, tiny_gpt2, tiny_llama
):
    """A checkpointed pipeline died part done; its script is run again with a setting edited (seed 3 -> 4, a
    template, other outputs) or another model in the stage: the rows left were computed with those, the rows
    so far with the first, and the output mixed both without a word (a job resumed with other settings is
    refused). The restart is refused naming what differs and the ways out; the same settings go on (a seed of
    None is seed 0, as it computes); stages are told apart by position; without a checkpoint, or once Ray
    deleted it (a run that succeeded), anything goes."""
    pytest.importorskip("ray.data")
    from runner import ray as runner_ray

    config, planned = runner_ray.checkpoint_config(str(tmp_path / "ckpt")), []
    run = functools.partial(
        runner_ray.generate, _checkpointed(config, planned), map_kwargs={"compute": "given"}
    )
    params = GenerationParams(max_new_tokens=4, temperature=0.8, seed=3)
    run(model=tiny_gpt2, params=params)
    run(model=tiny_gpt2, params=params)
    refused = [
        ({"params": params.replaced(seed=4)}, "seed 3, now 4"),
        ({"params": params.replaced(max_new_tokens=5)}, "max_new_tokens 4, now 5"),
        ({"template": "Q: {prompt}"}, "template None, now 'Q: {prompt}'"),
        ({"outputs": ("top_logprobs",)}, "outputs"),
        ({"model": tiny_llama}, f"model {tiny_gpt2!r}, now {tiny_llama!r}"),
    ]
    for change, said in refused:
        with pytest.raises(runner.RunnerError) as e:
            run(**{"model": tiny_gpt2, "params": params, **change})
        assert said in str(e.value) and "was started with other settings" in str(e.value), str(e.value)
        assert "give another checkpoint path to start over" in str(e.value)
    assert len(planned) == 2
    # (seed None computes as seed 0: the same pipeline)
    unseeded = GenerationParams(max_new_tokens=4, temperature=0.8)
    shutil.rmtree(tmp_path / "ckpt")
    run(model=tiny_gpt2, params=unseeded)
    run(model=tiny_gpt2, params=unseeded.replaced(seed=0))
    # (a second stage is its own: score after generate, each kept at its place in the pipeline)
    shutil.rmtree(tmp_path / "ckpt")
    for _ in range(2):
        ds = runner_ray.generate(
            _checkpointed(config, planned), tiny_gpt2, params, map_kwargs={"compute": "given"}
        )
        runner_ray.score(ds, tiny_llama, map_kwargs={"compute": "given"})
    ds = runner_ray.generate(
        _checkpointed(config, planned), tiny_gpt2, params, map_kwargs={"compute": "given"}
    )
    with pytest.raises(runner.RunnerError, match=f"model {tiny_llama!r}, now {tiny_gpt2!r}"):
        runner_ray.score(ds, tiny_gpt2, map_kwargs={"compute": "given"})
    # without a checkpoint, or once it is gone, the settings of now are taken
    runner_ray.generate(_checkpointed(None, planned), tiny_llama, params, map_kwargs={"compute": "given"})
    shutil.rmtree(tmp_path / "ckpt")
    run(model=tiny_llama, params=params.replaced(seed=9))
    assert len(planned) == 11


def test_openai_batch_request_rows_are_error_rows_saying_so(tiny_gpt2):
    """Rows of an OpenAI Batch file (custom_id, method, url, body) read into Ray: each was an error row saying it
    had no id (it has a custom_id) or, with id_field="custom_id", no prompt. Each is now an error row keyed by
    its custom_id saying it is a Batch request and what takes those; a plain row beside them is computed."""
    import pyarrow as pa

    from runner.ray import Embed, Generate

    chat = {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}}  # fmt: skip
    said = ("body: an OpenAI Batch request (custom_id, method, url, body): a Ray stage reads plain rows (an id, "
            "the prompt or messages, settings as fields); run a Batch file with `runner run-batch` or `runner "
            "submit`, or turn each request's body into such a row first")  # fmt: skip
    for id_field in ("id", "custom_id"):
        stage = Generate(tiny_gpt2, GenerationParams(max_new_tokens=2, seed=1), id_field=id_field)
        out = stage(pa.Table.from_pylist([chat])).to_pylist()
        assert [(r["id"], r["error"]) for r in out] == [("req-1", said)]
    plain = {"id": "p", "prompt": "Hello", "url": "/v1/x", "body": {"a": 1}}
    out = Generate(tiny_gpt2, GenerationParams(max_new_tokens=2, seed=1))(pa.Table.from_pylist([plain]))
    assert out.column("error").to_pylist() == [None]
    embeddings = {
        "custom_id": "e-1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m", "input": "Hi"},
    }
    out = Embed(tiny_gpt2)(pa.Table.from_pylist([embeddings])).to_pylist()
    assert [(r["id"], r["error"]) for r in out] == [("e-1", said)]
