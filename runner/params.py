"""Generation settings and engine options: one validated object each, checked before any model work.

Flow: the CLI (or a Python caller) builds `GenerationParams` and `EngineOptions`; both validate every field in
`__post_init__` and raise `ParamError(field, message)` naming the field, its allowed range and the bad value.
A job stores them as plain dicts (`to_dict`) so it can be resumed without the original command line.

Names follow transformers' `GenerationConfig` so that Colab users can carry their `model.generate(...)` habits
over unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .errors import ParamError

DTYPES = ("auto", "float32", "float16", "bfloat16")
# as people write them (the README's "fp16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
TRUNCATE = ("none", "left")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ParamError(name, f"{name} must be {rng}, got {value}.")


def _check_range(name: str, value: float, ok: bool, allowed: str) -> None:
    if not ok:
        raise ParamError(name, f"{name} must be {allowed}, got {value}.")


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"{name} must be a number, got {value!r}.")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ParamError(name, f"{name} must be a finite number, got {value}.")
    return value


# Names people bring from transformers' generate and the OpenAI API: what runner calls them, and why
_SAID_ELSEWHERE = {
    "max_length": (
        "max_new_tokens",
        "transformers' max_length counts the prompt too; it counts new tokens only",
    ),
    "min_length": (
        "min_new_tokens",
        "transformers' min_length counts the prompt too; it counts new tokens only",
    ),
    "max_tokens": ("max_new_tokens", "OpenAI's max_tokens"),
    "stop_strings": ("stop", "transformers' GenerationConfig.stop_strings: a string or a list of them"),
    "n": ("num_return_sequences", "OpenAI's n"),
    # (as an input row spells them, or other APIs: said bare, or near another setting, `stop_sequences` asked "did
    # you mean 'num_return_sequences'?": adversarial pass 261)
    "stop_sequences": ("stop", "Anthropic's and Gemini's stop_sequences: a string or a list of them"),
    "max_completion_tokens": ("max_new_tokens", "OpenAI chat's max_completion_tokens"),
    "min_tokens": ("min_new_tokens", "vLLM's min_tokens"),
    "top_logprobs": ("logprobs", "OpenAI chat's top_logprobs: the K most likely alternatives of each token"),
    "response_format": (
        "json_schema",
        'OpenAI\'s response_format: its json_schema\'s "schema"; {"type": "json_object"} is json_object=True',
    ),
    "guided_json": ("json_schema", "vLLM's guided_json"),
    "guided_regex": ("regex", "vLLM's guided_regex"),
    "guided_choice": ("choices", "vLLM's guided_choice"),
    "guided_grammar": ("grammar", "vLLM's guided_grammar"),
}


# generate()'s token-id settings (the tutorials' `pad_token_id=tokenizer.eos_token_id`), which runner takes from
# the model and its tokenizer: what to do instead of each
_TAKEN_FROM_THE_MODEL = {
    "pad_token_id": "runner pads each batch itself (left padding with an attention mask): leave it out",
    "eos_token_id": "runner stops at the model's own EOS tokens (its generation_config.json's eos_token_id)",
    "bos_token_id": "runner takes the model's BOS from its tokenizer: leave it out",
}


def unknown_setting(cls: type, name: str) -> str:
    """What to say of a setting `cls` does not have: its name here, or the nearest one it has."""
    fields = [f.name for f in dataclasses.fields(cls)]
    ours, why = _SAID_ELSEWHERE.get(name, (None, ""))
    if ours in fields:
        return f"{cls.__name__} has no setting {name!r}: use {ours} ({why})."
    if name in _TAKEN_FROM_THE_MODEL:  # (it said only "has no setting 'pad_token_id'.")
        said = _TAKEN_FROM_THE_MODEL[name]
        if name == "eos_token_id":  # (a score or embed job generates nothing: it stops nowhere)
            said = (
                said + "; to end at some text, give stop"
                if "stop" in fields
                else "runner takes it from the model"
            )
        return f"{cls.__name__} has no setting {name!r}: {said}."
    near = _nearest(cls, name)
    return f"{cls.__name__} has no setting {name!r}" + (f": did you mean {near!r}?" if near else ".")


def as_params_hint(params: Any) -> str:
    """What to give instead of `params`, an object no job takes as its settings: a dict of settings, transformers'
    GenerationConfig (`model.generation_config`), engine options given in their place (each was only "params must
    be GenerationParams, ScoreParams or EmbedParams, not GenerationConfig": adversarial pass 261); "" for others."""
    if isinstance(params, EngineOptions):
        return "; engine options go in options=runner.EngineOptions(...)"
    if isinstance(params, dict):
        return "; a dict of settings makes one: runner.GenerationParams(**settings)"
    if type(params).__name__ != "GenerationConfig" or not hasattr(params, "to_diff_dict"):
        return ""
    ours = {f.name for f in dataclasses.fields(GenerationParams)}
    said = {"stop" if k == "stop_strings" else k: v for k, v in params.to_diff_dict().items()}
    given = ", ".join(f"{k}={v!r}" for k, v in said.items() if k in ours)
    return f"; transformers' GenerationConfig is not read: give runner.GenerationParams({given})"


def check_options(options: Any) -> None:
    """TypeError for `options` that are no EngineOptions (None: the defaults), saying what to give: generation
    settings given there, or a dict, failed deep in the engine ("'GenerationParams' object has no attribute
    'device'": adversarial pass 261)."""
    if options is None or isinstance(options, EngineOptions):
        return
    kind = type(options).__name__
    if isinstance(options, (GenerationParams, ScoreParams, EmbedParams)):
        hint = f"; a {kind} goes in params=runner.{kind}(...)"
    elif isinstance(options, dict):
        hint = "; a dict of engine options makes one: runner.EngineOptions(**options)"
    else:
        hint = ""
    raise TypeError(f"options must be EngineOptions, not {kind}{hint}")


def _nearest(cls: type, name: str) -> str | None:
    """The setting of `cls` spelled nearest `name` (`temprature`: temperature), if one is near."""
    near = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(cls)], n=1)
    return near[0] if near else None


def settings_arg(cls: type) -> str:
    """The argument of runner.run / submit ... a settings object of `cls` is given as: options or params."""
    return "options" if cls is EngineOptions else "params"


def _named_settings(cls: type) -> type:
    """A dataclass whose constructor refuses an unknown keyword with a ParamError that names it and says what it
    is called here (GenerationParams(max_length=50): max_new_tokens), not Python's bare TypeError. Each object
    keeps the names of the settings given to it (`_given`), one asked at its default too: a rerun that resumes a job
    says which engine options it does not apply (scheduler._kept_options), `--no-continuous-batching` included."""
    init = cls.__init__
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    known = set(fields)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ParamError(unknown[0], unknown_setting(cls, unknown[0]))
        given = frozenset(fields[: len(args)]) | frozenset(kwargs)
        old = _copied(type(self), sys._getframe(1))
        if old is not None:  # dataclasses.replace(old, ...): what its caller gave, and what old was given
            asked = _asked_of_copy(old, kwargs, fields)
            given = old._given | asked
            if "do_sample" in kwargs and "do_sample" not in asked:  # decided again, as it was for old
                # (old's given do_sample, None too: GenerationParams(do_sample=None) is decided, not given)
                kwargs["do_sample"] = old._do_sample_given
        init(self, *args, **kwargs)
        object.__setattr__(self, "_given", given)

    def __setattr__(self: Any, name: str, value: Any) -> None:
        """`params.temperature = 0.7` after construction: checked, and do_sample decided again, as by the
        constructor (it was stored unchecked: a greedy default ran greedy at 0.7, and a top_p of 5 failed the job
        just made as "job.json is invalid"). A refused value leaves the object as it was."""
        held = self.__dict__
        if "_given" not in held or name not in known:  # (the constructor's own assignments)
            # a numpy value as the Python one it holds: np.int64 from np.arange or a DataFrame is an int, a 1-d
            # array (`df["label"].unique()` for choices) a list; "seed must be an integer, got np.int64(3)" said
            # it was not (adversarial pass 261)
            held[name] = value.tolist() if type(value).__module__ == "numpy" else value
            return
        values = {f: getattr(self, f) for f in fields}
        if "do_sample" in known:  # as given (None: decided again), not as decided
            values["do_sample"] = self._do_sample_given
        fresh = cls(**{**values, name: value})
        self.__dict__.update({**fresh.__dict__, "_given": self._given | {name}})

    cls.__init__ = __init__
    cls.__setattr__ = __setattr__
    cls.__doc__ = _FieldDocs(cls.__doc__ or "")
    return cls


def _copied(cls: type, caller: Any) -> Any:
    """The settings object of `cls` that `dataclasses.replace` (`copy.replace`: `_replace`) is copying when it is
    the `caller` of its constructor, else None. replace gives the constructor every field, those its caller left
    out at the old object's values: taken as given, a copy's decided do_sample was given (`replace(params,
    temperature=0.7)` of a greedy default ran greedy at 0.7, n=4 four greedy copies) and a rerun's note named
    engine options no one asked for (adversarial pass 261)."""
    if caller.f_globals.get("__name__") != "dataclasses" or caller.f_code.co_name not in (
        "replace",
        "_replace",
    ):
        return None
    old = caller.f_locals.get("obj", caller.f_locals.get("self"))
    return old if type(old) is cls and hasattr(old, "_given") else None


def _asked_of_copy(old: Any, kwargs: dict[str, Any], fields: list[str]) -> frozenset[str]:
    """Of the keywords replace gave a copy of `old`, those its caller gave: replace adds each one left out
    after the caller's, in field order, as the very object `old` holds, so the run of such keywords at the end is
    replace's own (one the caller gave so, in field order, at old's value, is read as left out: the same value)."""
    names = list(kwargs)
    at = len(names)
    while (
        at
        and kwargs[names[at - 1]] is getattr(old, names[at - 1])
        and (at == len(names) or fields.index(names[at - 1]) < fields.index(names[at]))
    ):
        at -= 1
    return frozenset(names[:at])


class _FieldDocs:
    """A settings class's docstring with each field's own under it, so that `help(runner.GenerationParams)`
    says what each setting means and takes (Python keeps no docstring of a field: help showed the class's one
    line and the signature). Read from this file when first asked for, not at `import runner`."""

    def __init__(self, head: str) -> None:
        self.head, self.text = head, None

    def __get__(self, obj: Any, owner: type) -> str:
        if self.text is None:
            self.text = self.head + _fields_section(owner)
        return self.text


def _fields_section(cls: type) -> str:
    """Each field of `cls` as `name: type = default` over its docstring, indented as a docstring's lines are
    (so that inspect.cleandoc dedents them with it); "" when this file's source cannot be read."""
    import ast
    import inspect

    try:
        with open(__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return ""
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__), [])
    lines = []
    for node, after in zip(body, body[1:], strict=False):
        said = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and said:
            default = "" if node.value is None else f" = {ast.unparse(node.value)}"
            lines.append(f"    {node.target.id}: {ast.unparse(node.annotation)}{default}")
            lines += [f"        {line}".rstrip() for line in inspect.cleandoc(after.value.value).splitlines()]
    return "\n\n    Settings:\n\n" + "\n".join(lines) if lines else ""


# GenerationParams fields to_dict leaves out at these values (off), as job.json's params of jobs made before them
# lack them: a job made before min_p keeps its fingerprint
OFF_UNSAID = {"min_p": 0.0}

# vLLM's prompt_logprobs is a count of alternatives per prompt token, 0 for none (said of a number given)
VLLM_PROMPT_LOGPROBS = (
    " (vLLM's count of alternatives: runner keeps each prompt token's own log-prob, no alternatives)"
)

# Words today's refusals add to what a job read before reading 6 (inputs.READING) wrote in its errors.jsonl, with
# what it wrote instead: `runner repair` rebuilds that file in its submit's words (`said_before_6`), or its
# checksum never matches
_SAID_SINCE_6 = ((VLLM_PROMPT_LOGPROBS, ""), ("top_k, min_p, do_sample", "top_k, do_sample"))


def said_before_6(message: str) -> str:
    """A refusal's message as a runner before reading 6 worded it (`_SAID_SINCE_6`)."""
    for now, then in _SAID_SINCE_6:
        message = message.replace(now, then)
    return message


# vLLM's: a temperature below it decodes greedily (dividing by it overflows float32 logits)
SAMPLING_EPS = 1e-5


@_named_settings
@dataclass
class GenerationParams:
    """How to generate. Every field is checked on construction."""

    max_new_tokens: int = 64
    """Tokens to generate per sample, >= 1 (counts an EOS token if one is produced)."""
    min_new_tokens: int = 0
    """EOS and stop strings are suppressed until this many tokens exist, in [0, max_new_tokens]."""
    do_sample: bool | None = None
    """Sample (True) or greedy (False). None: sample iff temperature != 1 (but 0), top_p != 1, top_k != 0,
    min_p != 0 or n > 1. (A row's own temperature, top_p, top_k or min_p samples whatever its value but
    temperature 0: row_params.) False beside a temperature other than 0 and 1, or a top_p, top_k or min_p that is
    not off, is refused: greedy takes the most likely token, and they would do nothing (as `--greedy --temperature
    0.7` is refused)."""
    temperature: float = 1.0
    """Softmax temperature, >= 0; 0 means greedy (as in vLLM and the OpenAI API)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in [0, 1]; 1 disables it, 0 keeps only the most likely token (as OpenAI's top_p)."""
    top_k: int = 0
    """Keep only the k most likely tokens, >= 0; 0 disables it."""
    min_p: float = 0.0
    """Min-p sampling, in [0, 1]: drop the tokens less likely than min_p x the most likely token's probability
    (transformers' MinPLogitsWarper, after temperature, top_k and top_p, as transformers orders them; vLLM's
    and llama.cpp's min_p); 0 disables it."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in prompt or generation, > 0; 1 disables it."""
    presence_penalty: float = 0.0
    """OpenAI / vLLM presence penalty, in [-2, 2]: subtracted once from the logit of every token already
    generated in this sample; 0 disables it."""
    frequency_penalty: float = 0.0
    """OpenAI / vLLM frequency penalty, in [-2, 2]: subtracted from a token's logit once per time it was
    generated in this sample; 0 disables it."""
    num_return_sequences: int = 1
    """Samples per prompt (`-n`), in [1, 1024]; more than 1 turns sampling on unless the settings say greedy
    (temperature 0, do_sample false): then each is the greedy answer, as OpenAI's `n` at temperature 0 gives."""
    seed: int | None = None
    """Random seed, in [0, 2**64-1] (64 bits: an OpenAI Batch request's negative seed is its two's complement,
    -1 is 2**64-1). Same seed, file and settings give identical results. A job picks one (and records it) when
    none is given."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation of a sample ends at the first one; it is not included in `text`."""
    logprobs: int | None = None
    """Also return the K most likely alternatives of each generated token, in [0, 20] (as vLLM and the
    OpenAI API; the chosen token is always included). None: only the chosen token's log-prob."""
    prompt_logprobs: bool = False
    """Also return the log-prob of every prompt token (the first one has none)."""
    # Structured output (constraints.py): at most one of the next five. Decoding is held to the constraint token
    # by token; the result's `constraint_complete` says whether the text satisfies it (a sample cut by
    # max_new_tokens may not). `token_logprobs` stay the raw model's log-probs.
    json_schema: dict[str, Any] | None = None
    """Each sample is JSON satisfying this JSON schema (a dict, or its JSON text)."""
    json_object: bool = False
    """Each sample is a JSON object, any keys (OpenAI's response_format {"type": "json_object"})."""
    regex: str | None = None
    """Each sample's whole text matches this regular expression (Rust regex syntax: no lookaround)."""
    choices: list[str] | None = None
    """Each sample is exactly one of these non-empty strings."""
    grammar: str | None = None
    """Each sample is a sentence of this grammar (Lark as llguidance reads it, from `start:`; or llama.cpp GBNF)."""
    num_beams: int = 1
    """Beam search with this many beams, in [1, 64]; 1 is off. Deterministic (no sampling); `-n` returns the
    n best beams (n <= num_beams). Runs through transformers' own beam search, one prompt at a time."""
    length_penalty: float = 1.0
    """Beam search: the beam score is the sum of log-probs / length ** length_penalty; > 1 favours longer
    outputs, < 1 shorter (transformers' definition)."""
    early_stopping: bool = False
    """Beam search: stop as soon as num_beams finished candidates exist (transformers' `early_stopping=True`)."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this size (prompt included, as transformers does), >= 0; 0 is off. Rows that
    use it run through transformers' generate, one prompt at a time."""

    def __post_init__(self) -> None:
        # Normalise first (a single stop string becomes a list, ints become floats), then verify.
        self._normalise_stop()
        self._check_ranges()
        self._decide_sampling()
        self._check_beams()
        self._check_transformers_generate()
        self._check_constraint()

    def _normalise_stop(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ParamError("stop", f"stop must be a string or a list of strings, got {self.stop!r}.")
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise ParamError("stop", f"stop strings must be non-empty strings, got {s!r}.")

    def _check_ranges(self) -> None:
        """Each number in its range, each flag a bool; floats normalised."""
        _check_int("max_new_tokens", self.max_new_tokens, 1, 1_000_000)
        _check_int("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ParamError(
                "min_new_tokens",
                f"min_new_tokens must be <= max_new_tokens={self.max_new_tokens}, got {self.min_new_tokens}.",
            )
        self.temperature = _check_float("temperature", self.temperature)
        _check_range("temperature", self.temperature, self.temperature >= 0, ">= 0")
        self.top_p = _check_float("top_p", self.top_p)
        _check_range("top_p", self.top_p, 0 <= self.top_p <= 1, "in [0, 1]")
        if self.top_k == -1 and not isinstance(self.top_k, bool):  # vLLM's off, as --top-k and a row take it
            self.top_k = 0
        _check_int("top_k", self.top_k, 0)
        self.min_p = _check_float("min_p", self.min_p)
        _check_range("min_p", self.min_p, 0 <= self.min_p <= 1, "in [0, 1]")
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        _check_range("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            _check_range(name, value, -2 <= value <= 2, "in [-2, 2]")
            setattr(self, name, value)
        _check_int("num_return_sequences", self.num_return_sequences, 1, 1024)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, 20)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**64 - 1)
        _check_int("num_beams", self.num_beams, 1, 64)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, 1024)
        self.length_penalty = _check_float("length_penalty", self.length_penalty)
        _check_range("length_penalty", self.length_penalty, -10 <= self.length_penalty <= 10, "in [-10, 10]")
        for name in ("prompt_logprobs", "early_stopping"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                said = VLLM_PROMPT_LOGPROBS if name == "prompt_logprobs" and isinstance(value, int) else ""
                raise ParamError(name, f"{name} must be true or false, got {value!r}{said}.")

    @property
    def sampled(self) -> bool:
        """Whether tokens are drawn (else the likeliest is taken): do_sample, at a temperature that is not
        effectively 0 (OpenAI takes any temperature in [0, 2]; 1e-40 is greedy there, garbage when divided by)."""
        return bool(self.do_sample) and self.temperature >= SAMPLING_EPS

    def replaced(self, **changes: Any) -> GenerationParams:
        """A copy with `changes`, deciding do_sample again as this one was decided (dataclasses.replace would
        carry the decided value over as if it had been given: `--greedy` then, for what sampled by default)."""
        return dataclasses.replace(self, **{"do_sample": self._do_sample_given, **changes})

    def _decide_sampling(self) -> None:
        """do_sample None: sample iff temperature / top_p / top_k / min_p or n > 1 (without beams) ask for it."""
        # (None: decided here from the other settings; row_params redoes it)
        self._do_sample_given = self.do_sample
        if self.do_sample is None:
            asked = self.temperature != 1.0 or self.top_p != 1.0 or self.top_k != 0 or self.min_p != 0
            more = self.num_return_sequences > 1 and self.num_beams == 1  # n beams are not n samples
            self.do_sample = (asked or more) and self.temperature != 0
        elif not isinstance(self.do_sample, bool):
            raise ParamError("do_sample", f"do_sample must be true or false, got {self.do_sample!r}.")
        if self.do_sample and self.temperature == 0:
            raise ParamError("temperature", "temperature must be > 0 when sampling (do_sample), got 0.0.")
        # (as the CLI refuses --greedy --temperature 0.7: a greedy job "at 0.7" ran at no temperature, said
        # nowhere; job.json and a row's settings are read as recorded, `_as_recorded`)
        unused = [f for f in SAMPLING_FIELDS if getattr(self, f) != SAMPLING_OFF[f]]
        if self._do_sample_given is False and self.temperature != 0 and unused and not _AS_RECORDED.get():
            raise ParamError(unused[0], f"{unused[0]} has no effect with do_sample false, which takes the most "
                             f"likely token: give one of do_sample and {unused[0]}.")  # fmt: skip

    def _check_constraint(self) -> None:
        """Normalise the structured-output fields (schema text -> dict, a tuple of choices -> list), then check
        their shapes, that at most one is set, and that llguidance compiles it."""
        from . import constraints

        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except (ValueError, RecursionError) as e:  # (nested too deeply: pass 67)
                why = "nested too deeply" if isinstance(e, RecursionError) else e
                raise ParamError(
                    "json_schema", f"json_schema must be a JSON schema, got invalid JSON ({why})."
                ) from None
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            model = self.json_schema if isinstance(self.json_schema, type) else type(self.json_schema)
            # (a pydantic model, as vLLM's guided_json and the openai SDK's parse() take one, was only "got <class>")
            said = (
                f": give its schema, {model.__name__}.model_json_schema()"
                if hasattr(model, "model_json_schema")
                else ""
            )
            raise ParamError(
                "json_schema", f"json_schema must be a JSON schema object, got {self.json_schema!r}{said}."
            )
        _check_json_values(self.json_schema)
        if not isinstance(self.json_object, bool):
            raise ParamError("json_object", f"json_object must be true or false, got {self.json_object!r}.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ParamError(name, f"{name} must be a non-empty string, got {value!r}.")
        if isinstance(self.choices, tuple):
            self.choices = list(self.choices)
        if self.choices is not None and (
            not isinstance(self.choices, list) or not self.choices
            or not all(isinstance(c, str) and c for c in self.choices)
        ):  # fmt: skip
            raise ParamError("choices", f"choices must be a list of non-empty strings (in JSON, as "
                                        f"[\"yes\", \"no\"]), got {self.choices!r}.")  # fmt: skip
        given = [f for f in constraints.FIELDS if getattr(self, f) not in (None, False)]
        if len(given) > 1:
            raise ParamError(
                given[1], f"give one of {', '.join(constraints.FIELDS)}; got {given[0]} and {given[1]}."
            )
        if given and (self.num_beams > 1 or self.no_repeat_ngram_size):
            # those rows run through transformers' generate (hf_generate.py), which our constraint does not reach
            raise ParamError(
                given[0], f"{given[0]} cannot be combined with num_beams > 1 or no_repeat_ngram_size."
            )
        problem = constraints.problem(self) if given else None
        if problem:
            raise ParamError(given[0], f"{given[0]} {problem}")

    def _check_beams(self) -> None:
        if self.num_beams == 1:  # length_penalty / early_stopping are then unused (a row may turn beams off)
            return
        if self.do_sample:
            raise ParamError("num_beams", f"num_beams={self.num_beams} is beam search, which does not sample: "
                             "drop the sampling settings (temperature, top_p, top_k, min_p, do_sample), or use num_beams=1.")  # fmt: skip
        if self.num_return_sequences > self.num_beams:
            raise ParamError("num_return_sequences", f"num_return_sequences must be <= num_beams={self.num_beams}"
                             f" (the n best beams), got {self.num_return_sequences}.")  # fmt: skip

    def _check_transformers_generate(self) -> None:
        """Settings that only our own loop has cannot go with beam search or no_repeat_ngram_size."""
        if not self.uses_transformers_generate:
            return
        what = "num_beams" if self.num_beams > 1 else "no_repeat_ngram_size"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ParamError(name, f"{name} is not available with {what} (use repetition_penalty).")
        if self.logprobs is not None or self.prompt_logprobs:
            raise ParamError(what, f"logprobs / prompt_logprobs are not available with {what} "
                             "(each token's own log-prob is: token_logprobs).")  # fmt: skip

    @property
    def uses_transformers_generate(self) -> bool:
        """Beam search and no_repeat_ngram_size run through transformers' generate rather than our loop."""
        return self.num_beams > 1 or self.no_repeat_ngram_size > 0

    def prompt_budget(self, window: int | None) -> int | None:
        """Most prompt tokens that leave room for max_new_tokens in the model's context window (None: no
        limit). The one place this rule lives: submit checks the job's settings with it, and each row's."""
        if window is None:
            return None
        if window - self.max_new_tokens < 1:
            raise ParamError(
                "max_new_tokens",
                f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the model's "
                f"context window of {window} tokens.",
            )
        return window - self.max_new_tokens

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data. Structured-output fields and min_p are left out when unset (OFF_UNSAID),
        so that a job made before they existed keeps its fingerprint (and is resumed, not refused as other
        settings)."""
        from .constraints import FIELDS

        out = dataclasses.asdict(self)
        return {
            k: v for k, v in out.items()
            if (k not in FIELDS or v not in (None, False)) and (k not in OFF_UNSAID or v != OFF_UNSAID[k])
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        """The settings from `to_dict`'s plain data (an unknown key is refused, naming it: _named_settings), as
        recorded: a job made before do_sample false beside a temperature was refused resumes (`_as_recorded`)."""
        with _as_recorded():
            return cls(**data)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@_named_settings
@dataclass
class EngineOptions:
    """Where and how the model runs. These never change results beyond float rounding, so a job may be
    resumed with other values (a Colab T4 tonight, an A100 tomorrow; a worker says so when the precision it
    computes in differs from the job's newest rows')."""

    device: str = "auto"
    """auto, cpu, cuda or cuda:N. auto picks cuda when available."""
    dtype: str = "auto"
    """auto, float32, float16 or bfloat16. auto: float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    batch_size: int | None = None
    """Most sequences decoded together, >= 1. None: 64 on CPU; on a GPU 1,024 with >= 70 GiB of memory, else 256
    (batching.default_batch_size, benchmarks/RESULTS.md). The prompts of a batch are
    prefilled in smaller groups of similar length, so a bigger batch adds no padding to the prompt pass."""
    max_batch_tokens: int | None = None
    """Most tokens (rows x (longest prompt + max_new_tokens)) in one batch, >= 1; None picks from the device."""
    trust_remote_code: bool = False
    """Let a hub model run its own Python code (off unless asked for)."""
    allow_pickle: bool = False
    """Load pickle-based weights (pytorch_model.bin), which can run code when loaded; safetensors and GGUF
    need no such trust."""
    device_map: str | None = None
    """auto, balanced, balanced_low_0 or sequential: spread a model too large for one GPU over the GPUs (then
    CPU memory) with accelerate, as from_pretrained's device_map does. None: the whole model on `device`."""
    continuous_batching: bool = False
    """Refill the decode batch as rows end: a generate job's worker hands the engine several planned batches at
    once (tasks.REFILL_BATCHES), at most a batch's worth of rows decode together, and when rows end (EOS, stop
    string, their own max_new_tokens) waiting prompts are prefilled and join the running batch, instead of the
    batch running on until its longest row ends. Each row's result is what it gets alone, as with static
    batches. Off by default: on the 2-core CPU it was 1.2-1.3x faster at batch size 16 and 1.03x at 64
    (benchmarks/RESULTS.md), not worth making four batches what a kill loses and a crash record holds;
    1.34x on an H200 in bfloat16 (512 sampled chat rows, batch 256), where a float32 A/B is still to be run."""

    cuda_graphs: bool = False
    """Generate on a GPU: a static batch decodes in fixed slots over a preallocated KV cache, each decode step
    replayed as a CUDA graph (runner/graphs.py), against the host-bound launches of small models' steps. Off by
    default until measured on a GPU (benchmarks/gpu_check.sh measures it); ignored on a CPU, with
    `continuous_batching` and with `device_map`."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda", "mps")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ParamError("device", f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}.")
        if self.dtype in DTYPE_ALIASES:
            object.__setattr__(self, "dtype", DTYPE_ALIASES[self.dtype])
        if self.dtype not in DTYPES:
            raise ParamError("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        if self.max_batch_tokens is not None:
            _check_int("max_batch_tokens", self.max_batch_tokens, 1)
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ParamError(
                "device_map", f"device_map must be one of {', '.join(DEVICE_MAPS)}, got {self.device_map!r}."
            )
        for name in ("trust_remote_code", "allow_pickle", "continuous_batching", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be true or false, got {getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@_named_settings
@dataclass
class ScoreParams:
    """How to score texts (`runner score`). Like gpt2-score: the log-probability of each text under the model."""

    add_bos: bool = True
    """Prepend the BOS token (EOS for models without one, as GPT-2) as context, so the first word is scored
    too; the BOS itself is never scored."""
    add_eos: bool = False
    """Append EOS and score it too: "and then the text ends" (gpt2-score scores it unless --exclude-end)."""
    stride: int | None = None
    """Texts longer than the context window are scored in windows advancing by this many tokens, each token
    scored once with as much context as fits; None: half the window."""

    def __post_init__(self) -> None:
        for name in ("add_bos", "add_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.stride is not None:
            _check_int("stride", self.stride, 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@_named_settings
@dataclass
class EmbedParams:
    """How to embed texts (`runner embed`), as seed gpt2-transform does: one vector per text."""

    pooling: str = "mean"
    """mean: average of the last hidden states over the real tokens; last: the last real token's state."""

    def __post_init__(self) -> None:
        if self.pooling not in ("mean", "last"):
            raise ParamError("pooling", f"pooling must be mean or last, got {self.pooling!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Input-row fields that set a row's own generation settings (OpenAI and vLLM spellings too), and the
# GenerationParams field each sets.
ROW_SETTINGS = {
    "max_new_tokens": "max_new_tokens", "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
    "min_new_tokens": "min_new_tokens", "min_tokens": "min_new_tokens", "temperature": "temperature",
    "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "n": "num_return_sequences",
    "num_return_sequences": "num_return_sequences", "seed": "seed", "stop": "stop", "logprobs": "logprobs",
    "top_logprobs": "logprobs", "prompt_logprobs": "prompt_logprobs", "do_sample": "do_sample",
    # structured output: OpenAI's response_format, our own fields, and vLLM's guided_* spellings
    "response_format": "json_schema", "json_schema": "json_schema", "guided_json": "json_schema",
    "regex": "regex", "guided_regex": "regex", "choices": "choices", "guided_choice": "choices",
    "grammar": "grammar", "guided_grammar": "grammar",
    "num_beams": "num_beams", "length_penalty": "length_penalty", "early_stopping": "early_stopping",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
}  # fmt: skip


# Other tools' per-request settings that runner has no counterpart for (transformers' GenerationConfig, vLLM's
# SamplingParams, OpenAI's API): a plain row's column of such a name is data, and submit says so (a Batch body
# that gives one is refused instead); `stop_strings` (GenerationConfig's) is runner's `stop`
SETTINGS_RUNNER_LACKS = frozenset({
    "typical_p", "epsilon_cutoff", "eta_cutoff", "penalty_alpha", "diversity_penalty", "num_beam_groups",
    "encoder_repetition_penalty", "exponential_decay_length_penalty", "renormalize_logits", "guidance_scale",
    "eos_token_id", "pad_token_id", "bos_token_id", "forced_bos_token_id", "forced_eos_token_id",
    "bad_words_ids", "force_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "max_time",
    "ignore_eos", "stop_token_ids", "bad_words", "allowed_token_ids", "include_stop_str_in_output",
    "skip_special_tokens", "truncate_prompt_tokens", "use_beam_search", "logit_bias",
    # vLLM's structured-output fields beside guided_json/regex/choice/grammar (runner reads those)
    "structured_outputs", "structural_tag", "guided_whitespace_pattern", "guided_decoding_backend",
})  # fmt: skip
RENAMED_ROW_SETTINGS = {"stop_strings": "stop", "stop_sequences": "stop"}


# GenerationParams fields whose row values are whole numbers: 8.0 (pandas writes an integer column with gaps as
# floats) is 8; 16.5 is refused by the field's own check.
INT_SETTINGS = {"max_new_tokens", "min_new_tokens", "top_k", "num_return_sequences", "seed", "logprobs",
                "prompt_logprobs", "num_beams", "no_repeat_ngram_size"}  # fmt: skip
# ... and those whose CSV cell is text as written (a JSON list only for `stop` and `choices`)
TEXT_SETTINGS = {"stop", "regex", "grammar", "choices"}


def _check_json_values(schema: dict[str, Any] | None) -> None:
    """A schema dict from Python holds only what JSON has: a numpy integer (`df["age"].max()`) or a set raised
    json's TypeError naming no field, and a NaN reached llguidance as `NaN`, "expected value at line 1"."""
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ParamError("json_schema", "json_schema must hold JSON values only (dicts with string keys, lists, "
                         f"strings, numbers, true, false, null): {e}.") from None  # fmt: skip
    except RecursionError:  # (constraints.problem says "nested too deeply")
        pass


def cited_as(message: str, spellings: dict[str, str]) -> str:
    """`message` with each value it cites (`max_new_tokens=2`) under the name the user gave that setting
    (`spellings`: setting -> the row's or the Batch body's field): "min_tokens must be <= max_tokens=2"."""
    for setting, spelled in spellings.items():
        message = re.sub(rf"\b{setting}=", f"{spelled}=", message)
    return message


def check_truncate(truncate: str) -> None:
    """`--truncate`: none (a prompt over the context window is refused) or left (it keeps its end)."""
    if truncate not in ("none", "left"):
        raise ParamError("truncate", f"truncate must be none or left, got {truncate!r}.")


_TYPED_ESCAPES = re.compile(r"\\([\\ntr])")


def unescape(s: str) -> str:
    """A typed `\\n`, `\\t` or `\\r` as the line break, tab or carriage return it stands for, `\\\\` as one
    backslash: `--stop "\\n"` arrives as backslash + n from most shells, and a CSV cell typed in Excel holds the
    same; users mean a newline (as in seed QA prompts). Every other backslash stays as typed: `\\begin{proof}`,
    `C:\\Users` (Python's unicode_escape made a backspace of the one and a traceback of the other: pass 39)."""
    return _TYPED_ESCAPES.sub(lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), "\\"), s)


def setting_from_text(name: str, text: str | None, since_7: bool = True) -> Any:
    """A CSV cell of a setting column as a JSON line would give it: empty is no setting (the job's), then
    true/false in any case, numbers, JSON lists and objects; text settings (stop, regex, grammar, choices) as
    written unless a JSON list of `stop` or `choices` (a `stop` cell's typed `\\n`, `\\t`, `\\r` read as on the
    command line: `unescape`). What reads as none of these stays text, for the field's check to name
    ("temperature must be a number, got 'O.7'"). `since_7` False: a `stop` cell that only starts like a JSON
    list keeps its typed escapes, as a job read before reading 7 (inputs.READING) took it."""
    target = ROW_SETTINGS[name]
    if text is None or text == "" or (target not in TEXT_SETTINGS and not text.strip()):
        return None
    if target in TEXT_SETTINGS and not (target in ("stop", "choices") and text.lstrip().startswith("[")):
        return unescape(text) if target == "stop" else text  # `\n` typed in Excel, as `--stop "\n"` (pass 38)
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # (nested too deeply: pass 67) the setting's check names it
        # a `stop` cell that only starts like a JSON list ("[END]\n", "[/INST]") is plain text, its typed `\n`
        # a line break as in any other (it stayed a backslash and an n: adversarial pass 234)
        return unescape(text) if target == "stop" and since_7 else text


def row_overrides(raw: dict[str, Any], unread_refused: bool = True) -> dict[str, Any]:
    """An input row's setting fields as GenerationParams fields. Raises ParamError naming the row's own field
    when two spellings of one setting are given or a value has the wrong shape. `unread_refused`: a
    response_format key nothing reads is refused (False: dropped, as a job read before reading 6 took it)."""

    from .constraints import FIELDS

    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    present = [k for k, v in raw.items() if v is not None]
    if raw.get("logprobs") is False and "top_logprobs" in present:
        raise ParamError("top_logprobs", "top_logprobs needs logprobs: true (it is false in this row).")
    if "response_format" in present:
        other = [k for k in present if k != "response_format" and ROW_SETTINGS[k] in FIELDS]
        if other:
            raise ParamError(other[0], f"give one of 'response_format' and {other[0]!r}, not both.")
    for name, value in raw.items():
        target = ROW_SETTINGS[name]
        if value is None:  # a null setting (a Parquet / CSV column empty in this row, JSON null): the job's
            continue
        # OpenAI chat's pair is one setting: logprobs true/false + top_logprobs K (not logprobs N + top_logprobs K)
        pair = {name, given.get(target)} == {"logprobs", "top_logprobs"}
        chat_pair = pair and isinstance(raw["logprobs"], bool)
        if target in given and not chat_pair:
            raise ParamError(name, f"give one of {given[target]!r} and {name!r}, not both.")
        given.setdefault(target, name)
        if name == "logprobs" and isinstance(
            value, bool
        ):  # OpenAI chat: logprobs true/false (+ top_logprobs)
            value = 0 if value else None
            if target in out:
                continue
        if name == "response_format":
            out.update(response_format(value, unread_refused))
            continue
        if target in INT_SETTINGS and isinstance(value, float) and value.is_integer():
            value = int(value)
        if target == "top_k" and value == -1 and not isinstance(value, bool):
            value = 0  # vLLM's way of saying "off", in a Batch body or a plain row alike (pass 37)
        out[target] = value
    return out


def response_format(value: Any, unread_refused: bool = True) -> dict[str, Any]:
    """OpenAI's `response_format` as GenerationParams fields: {"type": "json_schema", "json_schema": {"name":
    ..., "schema": {...}}}, {"type": "json_object"}, or {"type": "text"} (no constraint, even if the job has one).
    `unread_refused` False: a key nothing reads is dropped, as a job read before reading 6 took it."""
    from .constraints import FIELDS

    kind = value.get("type") if isinstance(value, dict) else None
    if unread_refused and kind in ("text", "json_object", "json_schema"):
        _refuse_unread_keys(value, {"type", "json_schema"} if kind == "json_schema" else {"type"}, kind)
    if kind == "text":
        return {f: False if f == "json_object" else None for f in FIELDS}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ParamError(
                "response_format", 'response_format json_schema needs {"json_schema": {"schema": {...}}}.'
            )
        if unread_refused:
            _refuse_unread_keys(
                spec, {"name", "description", "schema", "strict"}, "json_schema", "json_schema."
            )
        if unread_refused and spec.get("strict") not in (None, True, False):
            raise ParamError("response_format", f"response_format json_schema.strict must be true or false, "
                             f"got {spec['strict']!r}.")  # fmt: skip
        return {"json_schema": spec["schema"]}
    raise ParamError(
        "response_format",
        f'response_format must be {{"type": "json_schema" | "json_object" | "text", ...}}, got {value!r}.',
    )


def _refuse_unread_keys(value: dict[str, Any], known: set[str], kind: str, within: str = "") -> None:
    """ParamError naming a key of `response_format` (or of its `json_schema`, `within`) that nothing reads: it
    would be dropped silently (`{"type": "json_object", "schema": {...}}`, as some servers take a schema, gave
    any object). A null one asks for nothing (the openai SDK's `model_dump()` writes them)."""
    unread = sorted(k for k, v in value.items() if k not in known and v is not None)
    if not unread:
        return
    # (a schema given flat, as some servers and OpenAI's Responses API take it: {"type": ..., "name", "schema"})
    hint = ': give {"type": "json_schema", "json_schema": {"schema": {...}}}' if "schema" in unread else ""
    raise ParamError("response_format", f"response_format {kind} takes no {within}{unread[0]!r} (it would be "
                     f"ignored; it takes {', '.join(within + k for k in sorted(known))}){hint}.")  # fmt: skip


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p")
SAMPLING_OFF = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
# Settings read as recorded (job.json, a row's own over its job's): do_sample false beside a sampling setting is
# the recorded greedy, not a new request to refuse (a row's do_sample false in a job at temperature 0.7; a job
# made in Python before GenerationParams refused the pair)
_AS_RECORDED: ContextVar[bool] = ContextVar("runner_settings_as_recorded", default=False)


@contextmanager
def _as_recorded() -> Any:
    token = _AS_RECORDED.set(True)
    try:
        yield
    finally:
        _AS_RECORDED.reset(token)


def _is_zero(value: Any) -> bool:
    return value == 0 and not isinstance(value, bool)


# job.json's "row_sampling" of the jobs whose rows sample when they give one of SAMPLING_FIELDS (`row_params`)
ROW_SAMPLING = "given"


def row_params(
    base: GenerationParams, sample_auto: bool, overrides: dict[str, Any], by_fields: bool = True
) -> GenerationParams:
    """The settings of a row: the job's, with the row's overrides (GenerationParams fields). Every value is
    checked; errors name the field.

    Sampling, `by_fields` (jobs since 2026-12-02, job.json's "row_sampling"): a row that gives a temperature,
    top_p, top_k or min_p samples, whatever the job does (as each request of the OpenAI API), but greedy at temperature
    0 (the row's, or the job's when the row gives none); a row that gives none of them samples as the job does,
    decided again for the row when the job left it to the settings (`sample_auto`: a row's n > 1 samples). A
    row giving do_sample false beside one of them is refused. Earlier jobs: sampling is decided again from the row's values when the job left it to the
    settings (a row's temperature 1.0 was greedy there), else it is the job's."""
    from .constraints import FIELDS

    if not overrides:
        return base
    values = base.to_dict()
    if any(f in overrides for f in FIELDS):  # the row's constraint replaces the job's
        values = {k: v for k, v in values.items() if k not in FIELDS}
    values.update(overrides)
    asked = [f for f in SAMPLING_FIELDS if f in overrides]
    if by_fields and overrides.get("do_sample") is False and asked:
        raise ParamError(asked[0], f"{asked[0]} has no effect with do_sample false, which takes the most "
                         f"likely token: give one of do_sample and {asked[0]}.")  # fmt: skip
    if "do_sample" not in overrides:
        if by_fields and asked:  # greedy at the row's or the job's temperature 0
            values["do_sample"] = not _is_zero(values["temperature"])
        elif sample_auto:
            values["do_sample"] = None
    with _as_recorded():  # (a row's do_sample false in a job at temperature 0.7: that row is greedy)
        return GenerationParams(**values)


def refuse_loose_settings(fn: str, params: Any, given: dict[str, Any], kinds: tuple[type, ...] = ()) -> None:
    """`runner.<fn>(..., max_new_tokens=64, do_sample=True)`, as `model.generate(...)` and transformers'
    pipeline take them: a TypeError naming the settings object they go in (`kinds`, default every kind, the
    kind of `params` first), with them inside it; any other keyword in `given` is Python's TypeError, said of
    `fn`, the name the user called (`runner.submit` said "create_job() got an unexpected keyword argument")."""
    # (a settings class given for its object is a dataclass too, with no fields of its kind)
    kind = (
        type(params)
        if dataclasses.is_dataclass(params) and not isinstance(params, type)
        else GenerationParams
    )
    kinds = kinds or (kind, GenerationParams, EngineOptions, ScoreParams, EmbedParams)
    for name in given:
        cls = next((c for c in kinds if name in {f.name for f in dataclasses.fields(c)}), None)
        ours, why = _SAID_ELSEWHERE.get(name, (None, ""))
        if cls is None and GenerationParams in kinds and ours:
            raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}: the setting is {ours} ({why}), "
                            f"runner.{fn}(..., params=runner.GenerationParams({ours}=...))")  # fmt: skip
        # (model.generate(..., pad_token_id=...) as the tutorials write it: said bare "unexpected keyword")
        if cls is None and name in _TAKEN_FROM_THE_MODEL:
            raise TypeError(
                f"{fn}() got an unexpected keyword argument {name!r}: {_TAKEN_FROM_THE_MODEL[name]}"
            )
        if cls is None:
            raise TypeError(
                f"{fn}() got an unexpected keyword argument {name!r}{_near_setting(fn, name, kinds)}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        inside = ", ".join(f"{k}={v!r}" for k, v in given.items() if k in fields)
        arg = settings_arg(cls)
        raise TypeError(
            f"{fn}() takes {name} in its settings, not as a keyword of its own: "
            f"runner.{fn}(..., {arg}=runner.{cls.__name__}({inside})){_refused_as_given(cls, given, fields)}"
        )


def _refused_as_given(cls: type, given: dict[str, Any], fields: set[str]) -> str:
    """What the settings object shown would refuse of the values given (do_sample=False beside temperature=0.7:
    the way shown raised next), else ""."""
    try:
        cls(**{k: v for k, v in given.items() if k in fields})
    except ParamError as e:
        return f", where they are refused: {e}"
    except (TypeError, ValueError):  # (a value no check names: the object says it when made)
        return ""
    return ""


def _near_setting(fn: str, name: str, kinds: tuple[type, ...]) -> str:
    """ ": did you mean ..." for a keyword spelled near a setting of one of `kinds` (`temprature`), else ""."""
    for cls in kinds:
        if near := _nearest(cls, name):
            return f": did you mean {near}, runner.{fn}(..., {settings_arg(cls)}=runner.{cls.__name__}({near}=...))?"
    return ""


def settings_apart(fn: str, kinds: tuple[type, ...] = ()) -> Any:
    """Decorates the function behind `runner.<fn>` so that a setting given as a keyword of its own is refused
    by `refuse_loose_settings` (before anything runs), the function's signature and docstring kept for help().
    A function taking **kwargs takes every keyword: none is refused for it."""
    import inspect

    def decorate(f: Any) -> Any:
        # (read once, not at each call)
        signature = inspect.signature(f)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())

        @functools.wraps(f)
        def call(*args: Any, **kwargs: Any) -> Any:
            loose = {} if takes_any else {k: v for k, v in kwargs.items() if k not in signature.parameters}
            if loose:
                known = {k: v for k, v in kwargs.items() if k not in loose}
                try:
                    params = signature.bind_partial(*args, **known).arguments.get("params")
                # (too many positional arguments: Python says so once the setting is where it goes)
                except TypeError:
                    params = None
                refuse_loose_settings(fn, params, loose, kinds)
            return f(*args, **kwargs)

        return call

    return decorate
