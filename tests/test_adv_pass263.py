"""Adversarial pass 263: a second reading of pass 261's settings objects (replace / assignment deciding do_sample
again), as users and runner's own paths use them: pickle (Ray, multiprocessing), copy, asdict, job.json, replace
of a replace, from a subclass or through functools.partial, every field assigned, numpy values.

Found, and kept fixed below:
- `GenerationParams(do_sample=None, ...)` (the documented "decide from the other settings", as a config's
  `"do_sample": null` or an argparse default gives it) then `params.temperature = 0.7`, or
  `dataclasses.replace(params, temperature=0.7)`, ran greedy at temperature 0.7, said nowhere (and n=4 gave four
  greedy copies): the do_sample to decide again was taken from whether do_sample was among the names given, and
  None given is given, so the decided False was carried over as if asked for. So after `params.do_sample = None`.
  Both now decide again from the do_sample the object was given (`_do_sample_given`, None: decided).
- `dataclasses.replace` of a subclass's object (`class MyParams(runner.GenerationParams): ...`, a method added)
  was not recognised as a copy (the object's type was compared with the decorated class itself): every field
  counted as given, and a greedy default copied at temperature 0.7 ran greedy. The copy is now recognised by the
  object's own type.

Held (no change): pickle, copy.copy and copy.deepcopy keep `_given` and `_do_sample_given`, and an assignment
after them still decides again; functools.partial(dataclasses.replace, params) is a replace; a replace of a
replace; asdict; job.json of the code before pass 261 (aaf8699) gives the same fingerprint and, run by either
runner, the same tokens (checked by hand on the tiny model, default / temperature / greedy / n=2 jobs with rows
giving their own temperature, n, top_p, do_sample and max_tokens). Cost: a GenerationParams built from a row's
values took 19 us against 12 before pass 261, a row's row_params 56 us against 48 (1.16x; timeit, 2-core CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import pickle

import pytest
from helpers import write_jsonl

from runner import GenerationParams
from runner.jobs import create_job


def test_an_assignment_after_do_sample_none_decides_sampling_again(tmp_path, tiny_gpt2):
    params = GenerationParams(max_new_tokens=2, do_sample=None)
    params.temperature = 0.7
    assert params.do_sample is True and params._do_sample_given is None
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "The old man"}])
    job = create_job(src, tiny_gpt2, params, job_dir=tmp_path / "j")
    assert job.meta["params"]["do_sample"] is True and job.meta["sample_auto"] is True
    params.temperature = 1.0  # (back to the default: greedy again, as GenerationParams(do_sample=None) is)
    assert params.do_sample is False
    reset = GenerationParams(do_sample=True)
    reset.do_sample = None
    reset.num_return_sequences = 4
    assert reset.do_sample is True and reset._do_sample_given is None


@pytest.mark.parametrize(
    ("changes", "sampled"),
    [({"temperature": 0.7}, True), ({"num_return_sequences": 4}, True), ({"max_new_tokens": 8}, False)],
)
def test_a_copy_of_settings_given_do_sample_none_decides_sampling_again(changes, sampled):
    copied = dataclasses.replace(GenerationParams(max_new_tokens=3, do_sample=None), **changes)
    assert copied.do_sample is sampled and copied._do_sample_given is None


def test_a_copy_of_a_subclass_object_decides_sampling_as_a_new_object_would():
    class MyParams(GenerationParams):
        def short(self) -> MyParams:
            return dataclasses.replace(self, max_new_tokens=2)

    copied = dataclasses.replace(MyParams(max_new_tokens=3), temperature=0.7)
    assert (
        type(copied) is MyParams
        and copied.do_sample is True
        and copied._given == {"max_new_tokens", "temperature"}
    )
    assert copied.short().do_sample is True


def test_pickled_copied_and_partially_replaced_settings_still_decide_sampling_again():
    import copy

    base = GenerationParams(max_new_tokens=3)
    for other in (pickle.loads(pickle.dumps(base)), copy.copy(base), copy.deepcopy(base)):
        assert other._given == {"max_new_tokens"} and other._do_sample_given is None
        other.temperature = 0.7
        assert other.do_sample is True
    assert base.do_sample is False  # (the original untouched)
    assert functools.partial(dataclasses.replace, base)(temperature=0.7).do_sample is True


def test_submit_makes_each_rows_settings_once(tmp_path, tiny_gpt2, monkeypatch):
    """Submit made a row's own settings three times (for its prompt budget, its count and its `n` column): two
    thirds of a submit of rows giving their own (a seed each), which pass 261's checked assignments made dearer.
    Once a distinct setting now, and every row's `n` as it gave it."""
    import runner.params

    made, real = [], runner.params.row_params

    def counted(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runner.params, "row_params", counted)
    rows = [{"id": f"r{i}", "prompt": "a b", "seed": i % 3, "n": 1 + i % 2} for i in range(12)]
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, GenerationParams(max_new_tokens=2),
                     job_dir=tmp_path / "j")  # fmt: skip
    assert len(made) == 6  # (seed, n): 6 distinct pairs
    import pyarrow.parquet as pq

    assert pq.read_table(job.dir / "prompts.parquet", columns=["n"])["n"].to_pylist() == [
        1 + i % 2 for i in range(12)
    ]
