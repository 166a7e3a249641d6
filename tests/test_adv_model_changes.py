"""A job's model changing between a first `runner work` and the next (adversarial pass 204): rows computed before
and after must come from the same model, or the job is refused, saying what changed and what to do."""

import json
import shutil

import pytest
from helpers import write_jsonl
from workers import run_worker

import runner
from runner import GenerationParams
from runner.jobdir import read_state
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


def test_a_hub_model_whose_cache_moved_to_another_snapshot_is_refused_on_resume(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """transformers 5 keeps no `_commit_hash` on a config: a hub model's fingerprint was its id alone, and a job
    resumed on whatever snapshot the cache (or the hub) held next, an update pushed since, without a word. The
    fingerprint names the snapshot the config resolves to; the same snapshot resumes as before."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    job = create_job(path, HUB_ID, GenerationParams(max_new_tokens=2))
    main.write_text(max(SNAPSHOTS))
    assert work(runner_home, echo=None) == []
    state = read_state(job.dir)
    assert state.state == "failed" and f"the model {HUB_ID!r} is not the one job {job.id}" in state.error
    assert "(its files or config changed (a hub model: a commit was pushed to it since));" in state.error
    main.write_text(min(SNAPSHOTS))
    runner.retry(job.dir)
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"


@pytest.mark.slow
def test_a_worker_killed_part_done_then_another_hub_snapshot_mixes_no_rows(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """The first `runner work` is killed after its first shard; the cache's refs/main then names another
    snapshot (`huggingface-cli download` of an update). The next `runner work` refuses the job: its saved rows
    are the first model's alone."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    job = create_job(path, HUB_ID, GenerationParams(max_new_tokens=2), runner.EngineOptions(batch_size=2))
    code, out = run_worker(runner_home, env_extra={"RUNNER_FAULT": "after_shard:2"})
    assert code == -9, out
    with pytest.warns(UserWarning, match="queued"):
        first = runner.load_results(job.dir)
    assert 0 < len(first) < len(ROWS)
    main.write_text(max(SNAPSHOTS))
    code, out = run_worker(runner_home)
    assert "is not the one job" in out and "runner retry" in out, out
    assert read_state(job.dir).state == "failed"
    with pytest.warns(UserWarning, match="is failed"):
        assert runner.load_results(job.dir).to_json() == first.to_json()


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
