"""A job's model changing between a first `runner work` and the next (adversarial pass 204): rows computed before
and after must come from the same model, or the job is refused, saying what changed and what to do."""

import functools
import json
import re
import shutil
import types

import pytest
from click.testing import CliRunner
from helpers import write_jsonl

import runner
from runner import GenerationParams, storage
from runner.cli import cli
from runner.jobdir import BrokenJob, Job, read_state, spec_checksum
from runner.jobs import create_job
from runner.scheduler import work

ROWS = [{"id": f"r{i}", "prompt": f"The old man number {i}"} for i in range(6)]
HUB_ID = "acme/tiny"
SNAPSHOTS = {"a" * 40: 0, "b" * 40: 1}


def _hub_cache(root, tiny_gpt2, monkeypatch):
    """A Hugging Face cache (offline) holding two snapshots of HUB_ID, other weights each, refs/main at the
    first; the path of refs/main. This process reads it through huggingface_hub's constants, the processes the
    tests start through the environment."""
    import huggingface_hub.constants as constants
    from tiny_models import build_tiny_gpt2

    repo = root / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    weights = build_tiny_gpt2(root / "other", seed=1) / "model.safetensors"
    for commit, seed in SNAPSHOTS.items():
        snapshot = shutil.copytree(tiny_gpt2, repo / "snapshots" / commit)
        if seed:
            shutil.copy(weights, snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(min(SNAPSHOTS))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "refs" / "main"


def _answers(job_dir) -> list[str]:
    return runner.load_results(job_dir).sort_values("id")["text"].tolist()


def _snapshot_answers(tmp_path, main, commit: str) -> list[str]:
    """What a job of HUB_ID computes with the cache's refs/main at `commit` (a job of its own, no pin asked)."""
    main.write_text(commit)
    path = write_jsonl(tmp_path / f"ref-{commit[0]}.jsonl", ROWS)
    job, summary = runner.run(path, HUB_ID, GenerationParams(max_new_tokens=2), echo=None)
    assert summary.finished and job.meta["model_revision"] == commit
    return _answers(job.dir)


def _unpinned(job) -> None:
    """`job` as a hub model's job submitted before 2026-12-07 holds it: no model_revision in job.json."""
    meta = {k: v for k, v in job.meta.items() if k != "model_revision"}
    meta["spec_sha256"] = spec_checksum(meta)
    for name in ("job.json", "job.backup.json"):
        storage.write_json(job.dir / name, meta)


def test_a_hub_model_job_runs_on_its_snapshot_wherever_the_cache_moves(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """transformers 5 keeps no `_commit_hash` on a config: a hub model's fingerprint was its id alone, and a job
    resumed on whatever snapshot the cache (or the hub) held next, an update pushed since, without a word. Then
    (fingerprint 7) such a job was refused, even for a README commit. Submit now pins the snapshot: the job
    runs on it whatever refs/main names when its worker starts."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    first, second = sorted(SNAPSHOTS)
    expected, other = _snapshot_answers(tmp_path, main, first), _snapshot_answers(tmp_path, main, second)
    assert expected != other  # (the two snapshots' weights answer apart)
    main.write_text(first)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    assert job.spec.revision == first
    main.write_text(second)
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"
    assert _answers(job.dir) == expected
    shown = CliRunner().invoke(cli, ["status", str(job.dir)])
    assert f"model:    {HUB_ID} (snapshot {first})" in shown.output, shown.output


def test_a_hub_job_of_before_pinning_is_refused_on_another_snapshot(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """A job submitted before pins (no model_revision) runs on the newest snapshot: one other than its own is
    refused, saying why, and the same one resumes after `runner retry`."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    _unpinned(job)
    main.write_text(max(SNAPSHOTS))
    assert work(runner_home, echo=None) == []
    state = read_state(job.dir)
    assert state.state == "failed" and f"the model {HUB_ID!r} is not the one job {job.id}" in state.error
    assert "(its files or config changed (a hub model: a commit was pushed to it since));" in state.error
    main.write_text(min(SNAPSHOTS))
    runner.retry(job.dir)
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"


def test_a_pinned_snapshot_missing_here_waits_and_says_how_to_get_it(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """The job's snapshot is not in this machine's offline cache (a new VM, the cache pruned): the job waits for
    a machine that has it, as a job whose model folder is not mounted does (it was failed for every machine);
    status and the worker say which commit and the command that downloads it; no other snapshot is taken."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    main.write_text(max(SNAPSHOTS))
    snapshot = main.parent.parent / "snapshots" / min(SNAPSHOTS)
    shutil.move(snapshot, tmp_path / "away")
    lines: list[str] = []
    assert work(runner_home, echo=lines.append) == []
    download = f"hf download {HUB_ID} --revision {min(SNAPSHOTS)}"
    assert any(download in line for line in lines), lines
    status = runner.status(job.dir)
    assert status.state == "queued" and download in status.message, status
    shutil.move(tmp_path / "away", snapshot)
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"


def test_runner_run_again_after_a_push_makes_a_job_of_the_new_snapshot(tmp_path, tiny_gpt2, monkeypatch):
    """`runner run FILE` again carries its job on while the hub model is as it was; once a commit was pushed it
    makes a new job, pinned to the new snapshot, as a first submit would (the old one keeps its own)."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    path, params = write_jsonl(tmp_path / "p.jsonl", ROWS), GenerationParams(max_new_tokens=2)
    old, _ = runner.run(path, HUB_ID, params, echo=None)
    assert runner.run(path, HUB_ID, params, echo=None)[0].id == old.id
    main.write_text(max(SNAPSHOTS))
    new, summary = runner.run(path, HUB_ID, params, echo=None)
    assert new.id != old.id and summary.finished and new.spec.revision == max(SNAPSHOTS)
    assert old.spec.revision == min(SNAPSHOTS) and _answers(new.dir) != _answers(old.dir)


def test_a_revision_asked_pins_the_job_to_the_commit_it_names(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    """--revision TAG (from_pretrained's revision=): the job runs on the commit the tag names at submit, main being
    elsewhere; the job's status shows it. `runner run` again is the same job while the tag stays, a new one once
    it moved. A revision the hub does not have, or one for a local folder, is refused naming the option."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    first, second = sorted(SNAPSHOTS)
    expected = _snapshot_answers(tmp_path, main, first)
    tag = main.parent / "v1"
    tag.write_text(first)
    main.write_text(second)
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    args = ["run", str(path), "-m", HUB_ID, "--revision", "v1", "--max-new-tokens", "2"]
    ran = CliRunner().invoke(cli, args)
    assert ran.exit_code == 0, ran.output
    job = Job.open(ran.output.strip().splitlines()[-1])
    assert job.spec.revision == first and _answers(job.dir) == expected
    shown = CliRunner().invoke(cli, ["status", str(job.dir)])
    assert f"(snapshot {first})" in shown.output, shown.output
    params = GenerationParams(max_new_tokens=2)
    assert runner.run(path, HUB_ID, params, revision="v1", echo=None)[0].id == job.id
    tag.write_text(second)
    moved, _ = runner.run(path, HUB_ID, params, revision="v1", echo=None)
    assert moved.id != job.id and moved.spec.revision == second
    assert create_job(path, HUB_ID, params, revision=first, name="by-commit").spec.revision == first
    with pytest.raises(runner.RunnerError, match=f"revision {first!r}, now 'v1'"):
        create_job(path, HUB_ID, params, revision="v1", name="by-commit")
    requests = [{"custom_id": r["id"], "method": "POST", "url": "/v1/completions",
                 "body": {"model": HUB_ID, "prompt": r["prompt"], "max_tokens": 2}} for r in ROWS]  # fmt: skip
    batch = write_jsonl(tmp_path / "batch.jsonl", requests)
    ran = CliRunner().invoke(cli, ["run-batch", "-i", str(batch), "-o", str(tmp_path / "out.jsonl"), "-m", HUB_ID,
                                   "--revision", first])  # fmt: skip
    assert ran.exit_code == 0 and Job.open(tmp_path / "out.jsonl.job").spec.revision == first, ran.output
    refused = CliRunner().invoke(cli, ["submit", str(path), "-m", HUB_ID, "--revision", "v9"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
    assert "at revision 'v9' (--revision)" in refused.output, refused.output
    assert f"(not in this machine's cache: hf download {HUB_ID} --revision v9)" in refused.output, (
        refused.output
    )
    with pytest.raises(runner.ParamError, match="revision names a snapshot of a Hugging Face hub model") as e:
        create_job(path, str(tiny_gpt2), params, revision="v1")
    assert e.value.param == "revision"
    tried = CliRunner().invoke(cli, ["generate", "The old man number 0", "-m", HUB_ID, "--revision", first,
                                     "--max-new-tokens", "2"])  # fmt: skip
    assert tried.exit_code == 0 and tried.output.split("] ", 1)[1].rstrip("\n") == expected[0], tried.output


def test_a_revision_in_job_json_that_is_not_a_commit_breaks_only_that_job(tmp_path, tiny_gpt2, monkeypatch):
    _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    meta = {**job.meta, "model_revision": "main"}
    meta["spec_sha256"] = spec_checksum(meta)
    storage.write_json(job.dir / "job.json", meta)
    with pytest.raises(BrokenJob, match="model_revision must be a commit id"):
        Job.open(job.dir)


def test_a_chat_template_file_edited_in_the_model_folder_counts_as_its_tokenizer(tmp_path, tiny_llama):
    """transformers 5 saves a model's chat template as chat_template.jinja, not in tokenizer_config.json, and
    the fingerprint did not read it: `runner run` of the same file with --chat after the template was edited
    returned the job rendered with the old one as done (an edit inside tokenizer_config.json made a new job).
    Its job, part done, is refused like a job whose tokenizer changed."""
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    assert (model / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((model / "tokenizer_config.json").read_text())
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    params = GenerationParams(max_new_tokens=2)
    first, _ = runner.run(path, str(model), params, chat=True, echo=None)
    queued = create_job(path, str(model), params, chat=True, name="queued")
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(template.replace("<|im_start|>", "<|start|>"))
    again, summary = runner.run(path, str(model), params, chat=True, echo=None)
    assert again.id != first.id and summary.finished
    assert all("<|start|>" in p for p in runner.load_results(again.dir)["prompt"])
    assert [s.job_id for s in work(echo=None)] == []
    state = read_state(queued.dir)
    assert state.state == "failed" and "is not the one job" in state.error


def test_only_a_hub_id_is_said_to_be_a_hub_model(tmp_path, tiny_gpt2):
    """A refused resume says "(a hub model: a commit was pushed to it since)" of a hub id only: it said so of the
    demo alias too (no folder of that name here), whose fingerprint is its GGUF file's, not a snapshot's."""
    from runner.models import DEMO_MODEL, is_hub_model

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert is_hub_model("gpt2") and is_hub_model(HUB_ID)
    assert not any(is_hub_model(s) for s in (DEMO_MODEL, "SmolLM2-135M-Instruct", str(tiny_gpt2), str(gguf)))


def test_a_ray_pipeline_pins_one_snapshot_for_all_its_actors(tmp_path, tiny_gpt2, monkeypatch):
    """runner.ray.generate pins the hub model's commit in the driver: an actor started after refs/main moved (an
    autoscaled one, one restarted after a node died) loads the pinned snapshot, not the newest, so a pipeline's
    rows come from one model; `revision=` picks a branch or tag, as a job's."""
    import pyarrow as pa

    from runner import ray as runner_ray

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    first, second = sorted(SNAPSHOTS)
    expected = _snapshot_answers(tmp_path, main, first)
    planned = []
    pipeline = type("Dataset", (), {"map_batches": lambda self, stage, **kw: planned.append((stage, kw))})()
    runner_ray.generate(pipeline, HUB_ID, GenerationParams(max_new_tokens=2), map_kwargs={"compute": "given"})
    ((stage, kw),) = planned
    assert kw["fn_constructor_kwargs"]["revision"] == first
    assert kw["fn_constructor_kwargs"]["fingerprint"] is None  # (its commit is what is pinned)
    main.write_text(second)  # an actor starting from here
    actor = stage(*kw["fn_constructor_args"], **kw["fn_constructor_kwargs"])
    out = actor(pa.Table.from_pylist(ROWS)).to_pandas().sort_values("id")
    assert out["text"].tolist() == expected
    runner_ray.generate(pipeline, HUB_ID, GenerationParams(max_new_tokens=2), revision=first,
                        map_kwargs={"compute": "given"})  # fmt: skip
    assert planned[-1][1]["fn_constructor_kwargs"]["revision"] == first


def test_a_pinned_snapshot_the_hub_cannot_send_now_leaves_the_job_waiting(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """Online (no HF_HUB_OFFLINE) with the network down, the pinned commit that is not in the cache cannot be
    downloaded: that is this machine's lack, like a snapshot missing offline, and the job waits for a machine
    that has it instead of failing for every worker of the home. (The download is refused here by the hub
    client's own offline mode, behind runner's look: the same LocalEntryNotFoundError a dead network gives.)"""
    from runner import models

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    main.write_text(max(SNAPSHOTS))
    snapshot = main.parent.parent / "snapshots" / min(SNAPSHOTS)
    shutil.move(snapshot, tmp_path / "away")
    monkeypatch.setattr(models, "_missing_snapshot", lambda *a: None)  # as online: the load is tried
    lines: list[str] = []
    assert work(runner_home, echo=lines.append) == []
    assert read_state(job.dir).state == "queued"
    assert any(f"hf download {HUB_ID} --revision {min(SNAPSHOTS)}" in line for line in lines), lines
    shutil.move(tmp_path / "away", snapshot)
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"


def test_a_passing_read_error_in_the_hub_cache_is_read_again(tmp_path, tiny_gpt2, runner_home, monkeypatch):
    """HF_HOME on a Drive mount (to keep downloads across Colab VMs): one EIO while the worker looks for the
    pinned snapshot in the cache is read again, not the end of the worker, nor the job's."""
    import errno

    from runner import jobs, models

    _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    real, failures = models._snapshot_lacks, [1]

    def flaky(*args):
        if failures and failures.pop():
            raise OSError(errno.EIO, "Input/output error", "config.json")
        return real(*args)

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setattr(models, "_snapshot_lacks", flaky)
    assert work(runner_home, echo=None)[0].finished and not failures
    assert read_state(job.dir).state == "completed"
    real_newest, failures = jobs.hub_newest_here, [1]

    def flaky_newest(*args):
        if failures and failures.pop():
            raise OSError(errno.EIO, "Input/output error", "refs/main")
        return real_newest(*args)

    monkeypatch.setattr(jobs, "hub_newest_here", flaky_newest)  # `runner run` of the file again: the same job
    again, _ = runner.run(tmp_path / "p.jsonl", HUB_ID, GenerationParams(max_new_tokens=2), echo=None)
    assert again.id == job.id and not failures


def test_an_engine_given_of_another_model_or_snapshot_is_refused_and_the_job_left_as_it_was(
    tmp_path, tiny_gpt2, gpt2_engine, runner_home, monkeypatch
):
    """`runner.run(..., engine=E)` and `run_job(job, E)` computed every row with E's model, whatever the job's
    was, and recorded them as the job's. An engine of another model (other weights, or another snapshot than
    the job's pinned one) is the caller's mistake: ValueError, and the job stays queued with no row computed. A
    copy of the job's model folder is the same model."""
    from tiny_models import build_tiny_gpt2

    from runner.engine import Engine
    from runner.worker import run_job

    other = build_tiny_gpt2(tmp_path / "other", seed=1)
    path, params = write_jsonl(tmp_path / "p.jsonl", ROWS), GenerationParams(max_new_tokens=2)
    job = create_job(path, str(other), params, name="other")
    with pytest.raises(ValueError, match=f"the engine given holds model {str(tiny_gpt2)!r}; job {job.id}"):
        run_job(job, gpt2_engine, echo=None)
    assert read_state(job.dir).state == "queued" and runner.status(job.dir).done == 0
    copy = create_job(path, str(shutil.copytree(tiny_gpt2, tmp_path / "copy")), params, name="copy")
    assert run_job(copy, gpt2_engine, echo=None).finished  # (a copy of the engine's folder: the same weights)
    assert run_job(job, Engine(str(other)), echo=None).finished  # (its own model: runs)
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    pinned = create_job(path, HUB_ID, params, name="pinned")
    main.write_text(max(SNAPSHOTS))
    newer = Engine(HUB_ID, revision=max(SNAPSHOTS))
    with pytest.raises(ValueError, match=f"at {max(SNAPSHOTS)}; job {pinned.id} is of model 'acme/tiny' at "):
        runner.run(path, HUB_ID, params, engine=newer, echo=None, name="pinned")
    # loaded without a revision after refs/main moved: the newest snapshot, not the job's (it was taken for any)
    with pytest.raises(ValueError, match=f"at {max(SNAPSHOTS)}; job {pinned.id} is of model 'acme/tiny' at "):
        run_job(pinned, Engine(HUB_ID), echo=None)
    assert runner.status(pinned.dir).done == 0
    main.write_text(min(SNAPSHOTS))  # (loaded at the job's snapshot, named or the newest: runs)
    assert run_job(pinned, Engine(HUB_ID), echo=None).finished


def test_a_stage_of_your_own_checks_its_revision_as_a_job_does(tmp_path, tiny_gpt2):
    """`ds.map_batches(runner.ray.Generate, fn_constructor_kwargs={"revision": ...})`: an empty revision, or one
    for a local folder, is refused naming it, as `runner submit --revision` refuses it (an empty one loaded the
    newest snapshot without a word)."""
    from runner.ray import Generate

    for model, revision in ((HUB_ID, ""), (str(tiny_gpt2), "v1")):
        with pytest.raises(runner.ParamError) as e:
            Generate(model, GenerationParams(max_new_tokens=2), revision=revision)
        assert e.value.param == "revision"


def test_a_quick_try_with_an_engine_and_a_revision_checks_the_engine_holds_that_snapshot(
    tmp_path, tiny_gpt2, monkeypatch
):
    """`runner.generate(..., engine=E, revision=R)` answered with E whatever R named: E's snapshot, said to be
    R's. An engine of another snapshot (named, or the newest when it was loaded without one), or of another
    model, is refused naming both; one loaded at R's commit, or at R as written, answers."""
    from runner.engine import Engine

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    first, second = sorted(SNAPSHOTS)
    params = GenerationParams(max_new_tokens=2)
    at_first, newest = Engine(HUB_ID, revision=first), Engine(HUB_ID)
    refused = [
        (
            at_first,
            second,
            f"holds model 'acme/tiny' at {first}; revision='{second}' names 'acme/tiny' at {second}",
        ),
        (newest, second, f"holds model 'acme/tiny' at {first}; revision='{second}' names 'acme/tiny' at "),
        (
            Engine(str(tiny_gpt2)),
            first,
            f"holds model {str(tiny_gpt2)!r}; revision='{first}' names 'acme/tiny'",
        ),
    ]
    for engine, revision, said in refused:
        with pytest.raises(ValueError, match=re.escape(said)):
            runner.generate("The old man", HUB_ID, params, engine=engine, revision=revision)
    expected = runner.generate("The old man", HUB_ID, params, revision=first)
    for revision in (first, "main"):  # (refs/main names the first)
        assert runner.generate("The old man", HUB_ID, params, engine=at_first, revision=revision) == expected
    main.write_text(second)
    with pytest.raises(ValueError, match=f"at {first}; revision='main' names 'acme/tiny' at {second}"):
        runner.generate("The old man", HUB_ID, params, engine=at_first, revision="main")


def _checkpointed(config, planned: list, dag=None):
    """A stand-in for a ray.data.Dataset made while `config` was the DataContext's checkpoint_config: what
    `map_batches` was given lands in `planned`; the Dataset it gives holds that stage on top of its logical
    plan, as Ray's does (an operator's `fn`, `fn_constructor_args` and `input_dependencies`)."""
    context = types.SimpleNamespace(checkpoint_config=config)
    plan = types.SimpleNamespace(dag=dag or types.SimpleNamespace(input_dependencies=[]))

    def map_batches(self, stage, **kw):
        planned.append(kw)
        args = kw["fn_constructor_args"]
        return _checkpointed(config, planned, types.SimpleNamespace(
            fn=stage, fn_constructor_args=args, input_dependencies=[plan.dag]))  # fmt: skip

    return type("Dataset", (), {"context": context, "_logical_plan": plan, "map_batches": map_batches})()


@pytest.mark.parametrize("store", ["folder", "object store"])
def test_a_checkpointed_ray_pipeline_run_again_after_an_update_keeps_its_first_commit(
    tmp_path, tiny_gpt2, monkeypatch, store
):
    """A checkpointed pipeline pinned the newest commit each time its script started: run again after an update
    of the model was pushed (its driver died), the rows left came from the new weights, those written before
    from the old, without a word. The commit is now kept beside the checkpoint (written whole) and used again;
    a revision naming another commit is refused naming both; without a checkpoint, or once Ray deleted it (a
    run that succeeded), the newest is pinned. The same through a pyarrow file system (an object store's)."""
    pytest.importorskip("ray.data")
    import pyarrow.fs as pafs

    from runner import ray as runner_ray

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    first, second = sorted(SNAPSHOTS)
    if store == "folder":
        config, ckpt = runner_ray.checkpoint_config(str(tmp_path / "ckpt")), tmp_path / "ckpt"
    else:
        (tmp_path / "bucket").mkdir()
        fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
        config, ckpt = (
            runner_ray.checkpoint_config("ckpt", override_filesystem=fs),
            tmp_path / "bucket" / "ckpt",
        )
    planned, params = [], GenerationParams(max_new_tokens=2)
    run = functools.partial(runner_ray.generate, _checkpointed(config, planned), HUB_ID, params,
                            map_kwargs={"compute": "given"})  # fmt: skip
    run()
    main.write_text(second)  # an update lands, the driver dies, the script runs again
    run()
    run(revision=first)
    assert [kw["fn_constructor_kwargs"]["revision"] for kw in planned] == [first] * 3
    for revision in (second, "main"):
        with pytest.raises(runner.ParamError, match=f"revision='{revision}' names 'acme/tiny' at {second}, but the "
                           f"checkpoint at .*ckpt was started on {first}"):  # fmt: skip
            run(revision=revision)
    runner_ray.generate(_checkpointed(None, planned), HUB_ID, params, map_kwargs={"compute": "given"})
    assert planned[-1]["fn_constructor_kwargs"]["revision"] == second
    assert [p.name for p in ckpt.iterdir()] == ["_runner"]  # (Ray's look at its checkpoint skips it)
    shutil.rmtree(ckpt)  # as Ray deletes a checkpoint once its run succeeded
    run()
    assert planned[-1]["fn_constructor_kwargs"]["revision"] == second


def test_a_damaged_pin_beside_a_ray_checkpoint_is_refused_not_obeyed(tmp_path, tiny_gpt2, monkeypatch):
    """The kept commit with a byte changed (another commit, still 40 hex digits) is not loaded: the pipeline is
    refused, naming the file and what to do."""
    pytest.importorskip("ray.data")
    from runner import ray as runner_ray

    _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    config, planned = runner_ray.checkpoint_config(str(tmp_path / "ckpt")), []
    runner_ray.generate(_checkpointed(config, planned), HUB_ID, map_kwargs={"compute": "given"})
    pins = tmp_path / "ckpt" / "_runner" / "pins.json"
    pins.write_text(pins.read_text().replace(min(SNAPSHOTS), max(SNAPSHOTS)))
    with pytest.raises(
        runner.RunnerError, match=f"{re.escape(str(pins))} is damaged .*Delete it and pass revision="
    ):
        runner_ray.generate(_checkpointed(config, planned), HUB_ID, map_kwargs={"compute": "given"})
    assert len(planned) == 1


def _saved_over(folder, root):
    """A fine-tune of the model in `folder` saved over it: other weights, same names and sizes."""
    from tiny_models import build_tiny_gpt2

    shutil.copy(build_tiny_gpt2(root / "tuned", seed=1) / "model.safetensors", folder / "model.safetensors")


@pytest.mark.parametrize("store", ["folder", "object store"])
def test_a_checkpointed_ray_pipeline_of_a_model_folder_saved_over_is_refused_on_restart(
    tmp_path, tiny_gpt2, store
):
    """A checkpointed pipeline of a model folder (no commit to pin), a fine-tune saved over the folder between
    its first run and its restart (a Colab notebook saving checkpoints to the same Drive folder): the rows left
    came from the new weights, those written before from the old, without a word. The model's fingerprint (a
    job's, computed as submit computes it) is now kept beside the checkpoint; the restart is refused naming the
    model, what changed and the two ways out; with the weights put back it goes on; without a checkpoint, or
    once Ray deleted it, the folder is taken as it is."""
    pytest.importorskip("ray.data")
    import pyarrow.fs as pafs

    from runner import ray as runner_ray

    folder = shutil.copytree(tiny_gpt2, tmp_path / "model")
    if store == "folder":
        config, ckpt = runner_ray.checkpoint_config(str(tmp_path / "ckpt")), tmp_path / "ckpt"
    else:
        (tmp_path / "bucket").mkdir()
        fs = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
        config = runner_ray.checkpoint_config("ckpt", override_filesystem=fs)
        ckpt = tmp_path / "bucket" / "ckpt"
    planned, params = [], GenerationParams(max_new_tokens=2)
    run = functools.partial(runner_ray.generate, _checkpointed(config, planned), str(folder), params,
                            map_kwargs={"compute": "given"})  # fmt: skip
    run()
    run()  # (the same weights: goes on)
    shutil.copytree(folder, tmp_path / "kept")
    _saved_over(folder, tmp_path)
    with pytest.raises(runner.RunnerError) as refused:
        run()
    said = str(refused.value)
    assert (
        f"the model {str(folder)!r} is not the one the checkpoint at " in said and "ckpt was started" in said
    )
    assert "its weights, config or tokenizer files changed" in said
    assert "put back the model's files as they were" in said and "or give another checkpoint path" in said
    assert len(planned) == 2
    runner_ray.generate(_checkpointed(None, planned), str(folder), params, map_kwargs={"compute": "given"})
    shutil.copy(tmp_path / "kept" / "model.safetensors", folder / "model.safetensors")  # (put back)
    run()
    assert len(planned) == 4
    _saved_over(folder, tmp_path)
    shutil.rmtree(ckpt)  # as Ray deletes a checkpoint once its run succeeded
    run()
    run()
    assert len(planned) == 6


def test_a_model_folders_fingerprint_kept_by_an_earlier_runner_is_compared_as_it_was_computed(
    tmp_path, tiny_gpt2, monkeypatch
):
    """The fingerprint kept beside a checkpoint is computed again the way it was (its version: a runner updated
    between the first run and the restart computes another version, for the same weights), and once more
    before the folder is taken for another (one torn read of a weight file on a network mount); a pins file of
    a runner that kept commits only is taken, the folder's fingerprint kept from now."""
    pytest.importorskip("ray.data")
    from runner import models
    from runner import ray as runner_ray

    config, planned = runner_ray.checkpoint_config(str(tmp_path / "ckpt")), []
    run = functools.partial(runner_ray.generate, _checkpointed(config, planned), tiny_gpt2,
                            map_kwargs={"compute": "given"})  # fmt: skip
    pins = tmp_path / "ckpt" / "_runner" / "pins.json"
    pins.parent.mkdir(parents=True)
    record = {"commits": {}}
    storage.write_json(pins, {**record, "check": storage.json_checksum(record)})
    run()
    (kept,) = json.loads(pins.read_text())["fingerprints"].values()
    assert kept == models.model_fingerprint(tiny_gpt2, models.load_config(tiny_gpt2))
    real, torn = models._tensor_samples, [1]
    monkeypatch.setattr(models, "_tensor_samples", lambda f: b"torn" if torn and torn.pop() else real(f))
    run()
    assert not torn
    older = models.model_fingerprint(tiny_gpt2, models.load_config(tiny_gpt2), "6")
    record = {"commits": {}, "fingerprints": {tiny_gpt2: older}}
    storage.write_json(pins, {**record, "check": storage.json_checksum(record)})
    run()
    assert len(planned) == 3 and json.loads(pins.read_text())["fingerprints"] == {tiny_gpt2: older}


def test_two_stages_of_one_hub_model_at_two_revisions_keep_a_commit_each(tmp_path, tiny_gpt2, monkeypatch):
    """A checkpointed pipeline with two stages of the same hub model at two commits (generate at one, score the
    answers at the other) was refused on its first run: the commits were kept by model, and the second stage
    found the first's. They are kept by stage (the stages of that model upstream of it, in the dataset's plan):
    each loads its own, on the first run and on the restart; a restart naming another commit for the second
    stage is refused, naming it."""
    pytest.importorskip("ray.data")
    from runner import ray as runner_ray

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    first, second = sorted(SNAPSHOTS)
    config, planned = runner_ray.checkpoint_config(str(tmp_path / "ckpt")), []

    def run(later=second):
        ds = runner_ray.generate(_checkpointed(config, planned), HUB_ID, revision=first,
                                 map_kwargs={"compute": "given"})  # fmt: skip
        return runner_ray.score(ds, HUB_ID, revision=later, map_kwargs={"compute": "given"})

    run()
    main.write_text(second)
    run(later=None)
    assert [kw["fn_constructor_kwargs"]["revision"] for kw in planned] == [first, second] * 2
    with pytest.raises(runner.ParamError, match=f"revision='{first}' names 'acme/tiny' at {first}, but its stage 2 "
                       f"of 'acme/tiny' in the checkpoint at .*ckpt was started on {second}"):  # fmt: skip
        run(later=first)


def test_a_ray_actor_started_after_a_fine_tune_was_saved_over_the_folder_refuses_to_start(
    tmp_path, tiny_gpt2, monkeypatch
):
    """The model folder is checked on the driver when the pipeline is built; an actor started later in the
    same run (autoscaled, or restarted after a crash) loaded the folder as it was then: a fine-tune saved over
    it mid-run made that actor's rows the new weights' and the others' the old, without a word. Each stage now
    gets the fingerprint pinned on the driver and its actor checks what it loaded against it: refused, naming
    the model and the ways out; the files put back, it starts; one torn read of a weight file is read again,
    not taken for another model."""
    import pyarrow as pa

    from runner import models
    from runner import ray as runner_ray

    folder = shutil.copytree(tiny_gpt2, tmp_path / "model")
    planned, params = [], GenerationParams(max_new_tokens=2)
    runner_ray.generate(_checkpointed(None, planned), str(folder), params, map_kwargs={"compute": "given"})
    (kw,) = planned
    assert kw["fn_constructor_kwargs"]["fingerprint"] == models.model_fingerprint(
        str(folder), models.load_config(str(folder))
    )
    start = functools.partial(runner_ray.Generate, *kw["fn_constructor_args"], **kw["fn_constructor_kwargs"])
    expected = start()(pa.Table.from_pylist(ROWS)).to_pandas()["text"].tolist()
    shutil.copytree(folder, tmp_path / "kept")
    _saved_over(folder, tmp_path)
    with pytest.raises(runner.RunnerError) as refused:
        start()
    said = str(refused.value)
    assert f"the model {str(folder)!r} is not the one this pipeline was started with" in said
    assert "put back the model's files as they were" in said and "run it again to start over" in said
    shutil.copy(tmp_path / "kept" / "model.safetensors", folder / "model.safetensors")  # (put back)
    real, torn = models._tensor_samples, [1]
    monkeypatch.setattr(models, "_tensor_samples", lambda f: b"torn" if torn and torn.pop() else real(f))
    assert start()(pa.Table.from_pylist(ROWS)).to_pandas()["text"].tolist() == expected
    assert not torn


def test_a_ray_actor_of_a_checkpointed_pipeline_checks_against_the_checkpoints_fingerprint(
    tmp_path, tiny_gpt2
):
    """With a checkpoint, the fingerprint an actor checks is the one kept beside it (that of the rows so far),
    not one computed anew."""
    pytest.importorskip("ray.data")
    from runner import ray as runner_ray

    folder = shutil.copytree(tiny_gpt2, tmp_path / "model")
    config, planned = runner_ray.checkpoint_config(str(tmp_path / "ckpt")), []
    runner_ray.generate(_checkpointed(config, planned), str(folder), map_kwargs={"compute": "given"})
    runner_ray.generate(_checkpointed(config, planned), str(folder), map_kwargs={"compute": "given"})
    (kept,) = json.loads((tmp_path / "ckpt" / "_runner" / "pins.json").read_text())["fingerprints"].values()
    assert [kw["fn_constructor_kwargs"]["fingerprint"] for kw in planned] == [kept, kept]
