"""The run config: its schema, its checks, and its TOML round trip.

A :class:`RunConfig` names the model (hub reference + entry), the InD data (calibration and test
splits, sizes, seed), the scores with their parameters and layers, the OoD scenarios
(perturbations of the InD test set and real OoD datasets) and the metrics. It round-trips through
TOML (``to_toml`` / ``from_toml``): the dashboard exports it and ``ood-lens run`` replays it.
Loading validates every key before anything is computed (pydantic models with unknown keys
forbidden, then the score, perturbation and metric registries): a :class:`ConfigError` lists each
problem as ``[section] key = value: expected ...``, with a "did you mean" for misspelt names.
Scenario titles must be unique and differ from ``"InD"``, compared after Unicode normalisation
(:func:`title_key`: look-alikes count as the same title); results are keyed by position. A config
file never grants trust: ``[model] trust_repo = true`` is read as a request
(:attr:`RunConfig.trust_requested`), never as consent (:attr:`RunConfig.trust_repo`).

This module is long because it is one concept: the config and every check of it (the pydantic
section models, the registry checks and the messages they produce belong together). A run of a
config is :func:`ood_core.runner.run`; its export is :func:`ood_core.bundle_writer.export`.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import tomllib
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ood_core import data as data_mod
from ood_core.devices import DeviceError, check_device_spec
from ood_core.layer_ids import LayerId, layer_text, layers_text, parse_layer_id, parse_layer_ids
from ood_core.metrics import DEFAULT_METRICS, Metric, parse_metric
from ood_core.perturbations import make_perturbation
from ood_core.report import score_label
from ood_core.scores import make_score
from ood_core.scores.base import BaseScore

MAX_N_BOOT = 10_000
"""Upper bound of ``[evaluation] n_boot`` (bootstrap resamples per score, set and metric)."""
MAX_BATCH_SIZE = 65_536
MAX_SEED = 2**31 - 1
IND_TITLE = "InD"
"""The in-distribution test set's label in every table; no scenario may use it as its title."""
MAX_CONFIG_CHARS = 10_000_000
"""Longest run config read, in characters (a config is a few kB)."""
MAX_CONFIG_DEPTH = 32
"""Deepest nesting of arrays and tables in a config, and most parts of one dotted key."""
MAX_SHOWN_PROBLEMS = 10
"""How many problems a :class:`ConfigError` message lists (``problems`` holds them all)."""
MAX_OUTPUT_KEY = 200
"""Longest ``[model] output`` key, in characters."""
MAX_WORKERS = 1024
"""Most ``[execution] workers`` (Ray actors, one model copy each)."""
MAX_ADDRESS = 1000
"""Longest ``[execution] address``, in characters."""
EXECUTORS = ("local", "ray")
"""``[execution] executor`` choices: this process's batched loop, or Ray Data actors."""
EXECUTION_DEFAULTS: dict[str, Any] = {
    "executor": "local",
    "address": "",
    "workers": 2,
    "device": "auto",
    "amp": None,
}
"""The ``[execution]`` settings of a config that leaves the table out (``amp`` None: full
precision; written ``amp = false``)."""


class ConfigError(ValueError):
    """An invalid run config; ``problems`` lists every problem found, each with its location
    (``[section] key = value: expected ...``)."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        shown = self.problems[:MAX_SHOWN_PROBLEMS]
        if len(self.problems) == 1:
            body = shown[0]
        else:  # the first few: a message stays readable whatever the file holds
            body = f"{len(self.problems):,} problems:\n" + "\n".join(f"  - {p}" for p in shown)
            if len(self.problems) > len(shown):
                body += f"\n  - ... and {len(self.problems) - len(shown):,} more"
        super().__init__(f"{source}: {body}" if source else body)


def _layer_texts(layers: list[Any]) -> list[Any]:
    """Layer ids as the one notation writes them (``[1, 5]``, ``"(1, 11)"`` -> ``"1-5"``,
    ``"1-11"``); an id that does not parse is kept as given (its check says why)."""
    out = []
    for layer in layers:
        try:
            out.append(layer_text(parse_layer_id(layer)))
        except (ValueError, TypeError):
            out.append(layer)
    return out


@dataclass
class ScoreSpec:
    """One score: registry name, constructor parameters, layer ids (``"d-i"`` strings)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    def build(self) -> BaseScore:
        """The score object. TOML has no null: the string ``"None"`` stands for ``None``."""
        params = {k: (None if v == "None" else v) for k, v in self.params.items()}
        return make_score(self.name, **params)

    def layer_ids(self) -> tuple[LayerId, ...]:
        return tuple(parse_layer_ids(self.layers))

    def key(self) -> tuple:
        return (
            self.name,
            tuple(sorted((k, repr(v)) for k, v in self.params.items())),
            self.layer_ids(),
        )


@dataclass
class ScenarioSpec:
    """A perturbation of the InD test images (``kind`` + params) or a real dataset (``dataset``).

    Results are keyed by the scenario's position, and its title (``describe()``) labels it in
    tables and plots: titles must be unique within a run and differ from ``"InD"``, compared by
    :func:`title_key` (so look-alikes count as the same). A given ``title`` is kept as
    :func:`clean_title` makes it (NFC, no invisible characters, no surrounding spaces)."""

    kind: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    split: str = "test"
    config: str | None = None
    title: str | None = None

    def __post_init__(self) -> None:
        if (self.kind is None) == (self.dataset is None):
            raise ValueError(
                "A scenario is either a perturbation (kind=...) or a dataset (dataset=...)."
            )
        if isinstance(self.title, str):
            self.title = clean_title(self.title)

    def describe(self) -> str:
        """The title: ``title`` if set, else one made from the kind and params or from the
        dataset, its config and its split (so sets differing only by config differ)."""
        if self.title:
            return self.title
        if self.kind is not None:
            return make_perturbation(self.kind, **self.params).describe()
        if self.dataset in data_mod.BUNDLED:
            title = data_mod.BUNDLED[self.dataset]["title"]
            return title if self.split == "test" else f"{title} ({self.split})"
        if self.config:
            return f"{self.dataset} ({self.config}, {self.split})"
        return f"{self.dataset} ({self.split})"

    def key(self) -> tuple:
        return (
            self.kind,
            tuple(sorted((k, repr(v)) for k, v in self.params.items())),
            self.dataset,
            self.split,
            self.config,
        )


@dataclass
class RunConfig:
    """Everything a run needs; see the module docstring and ``ood-lens example-config``.

    :meth:`from_toml` / :meth:`from_dict` validate every key (types, ranges, registry names,
    unknown keys) and raise :class:`ConfigError`; :meth:`validate` does the same for a config
    built in code (:func:`~ood_core.runner.run` calls it first). ``baseline`` is an index into
    ``scores`` or a score name (resolved to an index by validation)."""

    model_repo: str = "bundled"
    model_entry: str = "tiniest"
    trust_repo: bool = False
    """Consent to run the code of a non-bundled hub repository (its ``hubconf.py``), given only
    by the person at the keyboard: ``RunConfig(trust_repo=True)`` in Python, ``ood-lens run
    --trust-repo``, the dashboard's trust box. Never read from a file (:meth:`from_toml` and
    :meth:`from_dict` leave it False; see :attr:`trust_requested`) and never exported, so a
    shared config or bundle cannot hand over this consent."""
    output: int | str | None = None
    """``[model] output``: the element of the model's output holding the logits, an index or a
    key (:func:`~ood_core.core.select_output`); None: the whole output."""
    ind_dataset: str = "fashion_mnist"
    calibration_split: str = "calibration"
    test_split: str = "test"
    n_calibration: int | None = 1000
    n_test: int | None = 1000
    seed: int = 0
    streaming: bool = False
    """``[data] streaming``: read the calibration set batch by batch from a local parquet file
    or folder, or a Hugging Face id streamed (:mod:`ood_core.streams`), never whole in memory
    (see :func:`ood_core.runner.load_inputs`)."""
    scores: list[ScoreSpec] = field(default_factory=list)
    scenarios: list[ScenarioSpec] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: [repr(m) for m in DEFAULT_METRICS])
    baseline: int | str | None = 0
    n_boot: int = 0
    batch_size: int | None = None
    executor: str = "local"
    """``[execution] executor``: ``"local"`` (batched passes in this process) or ``"ray"`` (Ray
    Data actors, one model copy each, rebuilt from the hub spec: :mod:`ood_core.ray_engine`)."""
    address: str = ""
    """``[execution] address`` of an existing Ray cluster; ``""`` starts a local Ray (executor
    ``"ray"`` only)."""
    workers: int = 2
    """``[execution] workers``: Ray actors (executor ``"ray"`` only)."""
    device: str = "auto"
    """``[execution] device``: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"`` (:func:`ood_core.devices.resolve_device`, at run time; the
    resolved device is recorded in the run's provenance, this spec in the config)."""
    amp: str | None = None
    """``[execution] amp``: None (full precision; ``amp = false`` in TOML), ``"bf16"`` or
    ``"fp16"`` autocast of the forward passes (changes the numbers: part of :meth:`model_key`)."""
    trust_requested: bool = field(default=False, compare=False, repr=False)
    """The file said ``[model] trust_repo = true``: a request, never consent (``ood-lens run``
    then asks for ``--trust-repo``; everything else ignores it)."""

    def metric_objects(self) -> list[Metric]:
        return [parse_metric(m) for m in self.metrics]

    def model_key(self, device: str | None = None) -> tuple:
        """The model's identity in caches: ``(repo, entry)``, plus the output element if any,
        ``("amp", amp)`` under mixed precision and ``("device", device)`` for a ``device``
        (resolved, e.g. ``"cuda:0"``) other than the CPU: both change the numbers (AMP at the
        1e-2 level, CUDA kernels at the 1e-6 level). The executor and its workers are not part
        of it: the Ray executor computes what the local one does."""
        key: tuple = (self.model_repo, self.model_entry)
        if self.output is not None:
            key = (*key, self.output)
        if self.amp is not None:
            key = (*key, ("amp", self.amp))
        if device is not None and device != "cpu":
            key = (*key, ("device", device))
        return key

    def execution(self) -> dict[str, Any]:
        """The ``[execution]`` settings as a dict (keys of :data:`EXECUTION_DEFAULTS`)."""
        return {k: getattr(self, k) for k in EXECUTION_DEFAULTS}

    # ---------------------------------------------------------------- TOML round trip
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        out: dict[str, Any] = {
            "model": {"repo": d["model_repo"], "entry": d["model_entry"]}
            | ({} if d["output"] is None else {"output": d["output"]}),
            "data": {k: d[k] for k in ("ind_dataset", "calibration_split", "test_split", "seed")},
            "evaluation": {"metrics": d["metrics"], "n_boot": d["n_boot"]},
            "scores": [
                {k: v for k, v in s.items() if v not in ({}, [])}
                | {"layers": _layer_texts(s["layers"]), "params": _toml_safe(s["params"])}
                for s in d["scores"]
            ],
            "scenarios": [
                {k: v for k, v in s.items() if v not in (None, {})} for s in d["scenarios"]
            ],
        }
        for key in ("n_calibration", "n_test"):
            if d[key] is not None:
                out["data"][key] = d[key]
        if d["streaming"]:
            out["data"]["streaming"] = True
        if d["baseline"] is not None:
            out["evaluation"]["baseline"] = d["baseline"]
        if d["batch_size"] is not None:
            out["evaluation"]["batch_size"] = d["batch_size"]
        # like [data] streaming: written only where it differs from the defaults
        execution = {
            k: (False if v is None else v)
            for k, v in self.execution().items()
            if v != EXECUTION_DEFAULTS[k]
        }
        if execution:
            out["execution"] = execution
        return out

    def to_toml(self) -> str:
        header = (
            "# ood-lens run configuration: replay with `ood-lens run THIS_FILE --out DIR`.\n"
            "# Layer ids are torchinfo's depth-index ('1-11' = depth 1, index 11).\n\n"
        )
        return header + tomli_w.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> RunConfig:
        """Validate ``d`` (the TOML layout) and build the config, or raise :class:`ConfigError`
        listing every problem; ``source`` (a file name) prefixes the message."""
        config, problems = _check_config_dict(d)
        if problems:
            raise ConfigError(problems, source)
        return config

    @classmethod
    def from_toml(cls, text: str, source: str | None = None) -> RunConfig:
        """Parse and validate TOML text (:meth:`from_dict`). A leading UTF-8 byte-order mark is
        ignored; a text longer than :data:`MAX_CONFIG_CHARS` or nested deeper than
        :data:`MAX_CONFIG_DEPTH` is refused before it is parsed."""
        text = text.removeprefix("\ufeff")
        if len(text) > MAX_CONFIG_CHARS:
            raise ConfigError(
                [
                    f"the config is {len(text):,} characters long; a run config is at most "
                    f"{MAX_CONFIG_CHARS:,}"
                ],
                source,
            )
        if (problem := _toml_nesting_problem(text)) is not None:
            raise ConfigError([problem], source)
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"not valid TOML: {exc}"], source) from None
        except RecursionError:
            raise ConfigError(
                [f"not read: nested more than {MAX_CONFIG_DEPTH} levels deep"], source
            ) from None
        return cls.from_dict(d, source)

    def validate(self, source: str | None = None) -> RunConfig:
        """A checked copy (``baseline`` resolved to an index), or :class:`ConfigError`."""
        try:
            d = self.to_dict()
        except RecursionError:
            raise ConfigError(
                [f"cannot read the config: nested more than {MAX_CONFIG_DEPTH} levels deep"], source
            ) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError([f"cannot read the config: {exc}"], source) from None
        checked = RunConfig.from_dict(d, source)
        out = copy.deepcopy(self)
        out.baseline = checked.baseline
        return out


def _toml_safe(params: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null and no tuples: ``None`` -> ``"None"``, tuples -> lists."""
    return {
        k: "None" if v is None else (list(v) if isinstance(v, tuple) else v)
        for k, v in params.items()
    }


# ---------------------------------------------------------------------- config validation
# The TOML layout, one pydantic model per section (strict types, unknown keys forbidden). Each
# field's description is the "expected ..." part of its error message.
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


_N_HELP = "a whole number of samples >= 1 (leave the key out to use every sample)"


class _ModelSection(_Section):
    repo: str = Field(
        "bundled",
        min_length=1,
        description=(
            "a hub reference: 'bundled', a local folder with a hubconf.py, or 'owner/repo[:ref]'"
        ),
    )
    entry: str = Field("tiniest", min_length=1, description="an entry point name, e.g. 'tiniest'")
    trust_repo: bool = Field(
        False,
        description=(
            "true or false; only a request: a file never lets a repository's code run "
            "(pass --trust-repo, tick the dashboard's trust box or trust_repo=True in Python)"
        ),
    )
    output: int | str | None = Field(
        None,
        description=(
            "the element of the model's output holding the logits: an index >= 0 (0 for a "
            'model returning (logits, features)) or a key of at most 200 characters (e.g. "logits"); '
            "leave the key out for the whole output"
        ),
    )


class _DataSection(_Section):
    ind_dataset: str = Field(
        "fashion_mnist",
        min_length=1,
        description=(
            "a bundled dataset name, a local .parquet/.npz file or image folder, or a Hugging Face id"
        ),
    )
    calibration_split: str = Field("calibration", min_length=1, description="a split name")
    test_split: str = Field("test", min_length=1, description="a split name")
    n_calibration: int | None = Field(None, ge=1, description=_N_HELP)
    n_test: int | None = Field(None, ge=1, description=_N_HELP)
    seed: int = Field(0, ge=0, le=MAX_SEED, description=f"a whole number in [0, {MAX_SEED}]")
    streaming: bool = Field(False, description="true or false")


class _EvaluationSection(_Section):
    metrics: list[str] = Field(
        default_factory=lambda: [repr(m) for m in DEFAULT_METRICS],
        min_length=1,
        description='a non-empty list of metrics, e.g. ["AUC()", "TPR(max_fpr=0.05)"]',
    )
    baseline: int | str | None = Field(
        None, description=("the index (from 0) or the name of one of the [[scores]]")
    )
    n_boot: int = Field(
        0,
        ge=0,
        le=MAX_N_BOOT,
        description=(
            f"a whole number of bootstrap resamples in [0, {MAX_N_BOOT}] (0: no intervals)"
        ),
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH_SIZE,
        description=(
            f"a whole number of images per batch in [1, {MAX_BATCH_SIZE}] (leave it out: automatic)"
        ),
    )


class _ExecutionSection(_Section):
    executor: Literal["local", "ray"] = Field(
        "local",
        description='"local" (this process) or "ray" (Ray Data actors; pip install \'ood-lens[ray]\')',
    )
    address: str = Field(
        "",
        max_length=MAX_ADDRESS,
        description='the address of an existing Ray cluster, or "" to start a local Ray',
    )
    workers: int = Field(
        2,
        ge=1,
        le=MAX_WORKERS,
        description=f"a whole number of Ray actors in [1, {MAX_WORKERS}]",
    )
    device: str = Field(
        "auto",
        min_length=1,
        description='"auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N"',
    )
    amp: bool | Literal["bf16", "fp16"] = Field(
        False,
        description='false (full precision), "bf16" (CPU or CUDA) or "fp16" (CUDA only)',
    )


class _ScoreEntry(_Section):
    name: str = Field(min_length=1, description="a registered score name (`ood-lens scores`)")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description=("a table of the score's parameters (`ood-lens scores` lists them)"),
    )
    layers: list[str | list[int]] = Field(
        default_factory=list,
        description=('a list of layer ids like ["1-11"] (`ood-lens layers` lists them)'),
    )


class _ScenarioEntry(_Section):
    kind: str | None = Field(None, min_length=1, description="a perturbation kind, e.g. 'darker'")
    params: dict[str, Any] = Field(
        default_factory=dict, description=("a table of the perturbation's parameters")
    )
    dataset: str | None = Field(
        None,
        min_length=1,
        description=("a bundled dataset name, a local file or folder, or a Hugging Face id"),
    )
    split: str = Field("test", min_length=1, description="a split name")
    config: str | None = Field(None, min_length=1, description="a Hugging Face dataset config name")
    title: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description=("a non-empty label of at most 200 characters"),
    )


_SECTIONS: dict[str, type[_Section]] = {
    "model": _ModelSection,
    "data": _DataSection,
    "evaluation": _EvaluationSection,
    "execution": _ExecutionSection,
}
_ENTRIES: dict[str, type[_Section]] = {"scores": _ScoreEntry, "scenarios": _ScenarioEntry}


def _show(value: Any, limit: int = 80) -> str:
    """A value as TOML would write it (strings in double quotes, true/false), shortened;
    invisible characters in strings are written as ``\\uXXXX`` escapes (:func:`_visible`)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = _visible(json.dumps(value[: 2 * limit], ensure_ascii=False))
    elif isinstance(value, list | tuple | dict):
        table = isinstance(value, dict)
        parts: list[str] = []
        for k, v in value.items() if table else enumerate(value):
            parts.append(f"{_visible(str(k))} = {_show(v, limit)}" if table else _show(v, limit))
            if sum(map(len, parts)) > limit:  # long enough: a huge value costs nothing more
                break
        text = ", ".join(parts)
        text = "{" + text + "}" if table else "[" + text + "]"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _invisible(ch: str) -> bool:
    category = unicodedata.category(ch)
    return category in ("Cf", "Cc", "Zl", "Zp") or (category == "Zs" and ch != " ")


def _visible(text: str) -> str:
    """``text`` with invisible characters (zero-width spaces and joiners, other format and
    control characters, spaces other than U+0020) written as ``\\uXXXX`` escapes."""
    return "".join(f"\\u{ord(ch):04x}" if _invisible(ch) else ch for ch in text)


def _short_key(key: Any, limit: int = 40) -> str:
    """A key as a message shows it: invisible characters escaped, at most ``limit`` characters."""
    text = _visible(str(key))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_title(text: str) -> str:
    """A scenario title as kept and shown: Unicode NFC, without format characters (zero-width
    spaces and joiners, byte-order marks, direction marks) and without surrounding whitespace."""
    text = unicodedata.normalize("NFC", text)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf").strip()


def title_key(text: str) -> str:
    """What scenario titles are compared by (duplicates, the reserved ``"InD"``):
    :func:`clean_title`, then NFKC (full-width letters, ligatures), case folded, inner runs of
    whitespace as one space. ``"Café"`` in NFC and NFD, ``"InD\\u200b"``, ``"A "`` and ``"a"``
    are each the same title as their plain twin."""
    return " ".join(unicodedata.normalize("NFKC", clean_title(text)).casefold().split())


def _as_written(texts: list[str], plain: str | None = None) -> str:
    """For a message on look-alike titles: how ``texts`` were written (every non-ASCII character
    escaped), unless each is exactly ``plain`` (default: the first)."""
    if all(t == (texts[0] if plain is None else plain) for t in texts):
        return ""
    listed = " and ".join(json.dumps(t[:80]) for t in texts)
    return (
        f" (written {listed}; titles are compared after Unicode normalisation, without "
        "invisible characters, surrounding spaces or case)"
    )


_TOML_TOKEN = re.compile(r"[\"'#\[\]{}=,.\n]")


def _toml_nesting_problem(text: str, limit: int = MAX_CONFIG_DEPTH) -> str | None:
    """Why ``text`` is refused before parsing (arrays / inline tables nested deeper than
    ``limit``, or a dotted key of more than ``limit`` parts), or None. A cheap scan that skips
    strings and comments: the parser would recurse, or take quadratic time, on such input."""
    depth = dots = 0
    i, n = 0, len(text)
    while (m := _TOML_TOKEN.search(text, i)) is not None:
        ch, i = m.group(), m.start()
        if ch in "\"'":  # skip the string (basic strings have escapes)
            mark = ch * 3 if text.startswith(ch * 3, i) else ch
            j = i + len(mark)
            while j < n and not text.startswith(mark, j):
                if len(mark) == 1 and text[j] == "\n":
                    break  # unterminated: the parser reports it
                j += 2 if ch == '"' and text[j] == "\\" else 1
            i = j + len(mark)
            continue
        if ch == "#":
            i = n if (j := text.find("\n", i)) < 0 else j
            continue
        if ch in "[{":
            depth, dots = depth + 1, 0
            if depth > limit:
                line = text.count("\n", 0, i) + 1
                return (
                    f"not read: arrays or tables nested more than {limit} levels deep (line {line})"
                )
        elif ch in "]}":
            depth, dots = max(0, depth - 1), 0
        elif ch == ".":
            dots += 1
            if dots >= limit:
                line = text.count("\n", 0, i) + 1
                return f"not read: a dotted key of more than {limit} parts (line {line})"
        else:  # "=", "," or a new line: a new key or value
            dots = 0
        i += 1
    return None


def _nesting_problem(d: Any, limit: int = MAX_CONFIG_DEPTH) -> str | None:
    """Where ``d`` (a parsed config) nests deeper than ``limit``, or None (iterative: no
    recursion however deep)."""
    stack: list[tuple[Any, int, str]] = [(d, 0, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > limit:
            return (
                f"{_short_key(path, 80)}: nested more than {limit} levels deep; a run config "
                "needs a few levels"
            )
        if isinstance(value, dict):
            stack += [(v, depth + 1, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            stack += [(v, depth + 1, f"{path}[{j}]") for j, v in enumerate(value)]
    return None


def _kind(value: Any) -> str:
    for types, name in (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list | tuple, "a list"),
        (dict, "a table"),
    ):
        if isinstance(value, types):
            return name
    return f"a {type(value).__name__}"


def _suggest(word: Any, options: Iterable[str]) -> str:
    """``' (did you mean "x"?)'`` for the closest option (difflib), or ``""``."""
    if not isinstance(word, str):
        return ""
    by_lower = {o.lower(): o for o in options}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {_show(by_lower[match[0]])}?)" if match else ""


def _explain(exc: ValidationError, where: str, model: type[_Section]) -> list[str]:
    """One message per pydantic error: location, value, what is expected."""
    fields = model.model_fields
    out: list[str] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        key = str(loc[0]) if loc else ""
        path = key + "".join(f"[{x}]" for x in loc[1:] if isinstance(x, int))
        if err["type"] == "extra_forbidden":
            hint = _suggest(key, fields) if len(key) <= 100 else ""
            msg = f"{where} {_short_key(key)}: unknown key{hint}; known keys: {', '.join(fields)}"
        elif err["type"] == "missing":
            msg = f"{where}: missing key '{key}': expected {fields[key].description}"
        elif key in fields:
            value = err["input"]
            msg = f"{where} {path} = {_show(value)} ({_kind(value)}): expected {fields[key].description}"
        else:
            msg = f"{where}: {err['msg']}"
        if msg not in seen:
            seen.add(msg)
            out.append(msg)
    return out


def _layer_problems(where: str, layers: list[Any]) -> tuple[list[LayerId], list[str]]:
    ids, problems = [], []
    for j, layer in enumerate(layers):
        try:
            lid = parse_layer_ids([layer])[0]
            if min(lid) < 0:
                raise ValueError
            ids.append(lid)
        except ValueError:
            problems.append(
                f"{where} layers[{j}] = {_show(layer)}: expected a layer id "
                '"depth-index" like "1-11" (`ood-lens layers` lists them)'
            )
    return ids, problems


def _score_problems(where: str, spec: ScoreSpec) -> tuple[BaseScore | None, list[str]]:
    """The built score (None if it cannot be built) and the problems of one [[scores]] entry."""
    from ood_core.scores import ALIASES, SCORES, get_score_class

    try:
        cls = get_score_class(spec.name)
    except ValueError:
        return None, [
            f"{where} name = {_show(spec.name)}: unknown score"
            f"{_suggest(spec.name, [*SCORES, *ALIASES])}; `ood-lens scores` lists them"
        ]
    declared = [p.name for p in cls.all_params()]
    problems = [
        f"{where} params.{k}: {cls.__name__} has no parameter {_show(k)}"
        f"{_suggest(k, declared)}; its parameters: {', '.join(declared)}"
        for k in spec.params
        if k not in declared
    ]
    score = None
    if not problems:
        try:
            score = spec.build()
        except (TypeError, ValueError) as exc:
            problems.append(f"{where} params: {exc}")
    ids, layer_problems = _layer_problems(where, spec.layers)
    problems += layer_problems
    if score is not None and not layer_problems and ids and cls.layer_rule == "none":
        problems.append(
            f"{where} layers = {_show(spec.layers)}: {cls.__name__} reads only the "
            "logits and would ignore them; remove layers"
        )
    elif score is not None and not layer_problems:
        try:
            score.check_layers(ids)
        except ValueError as exc:
            problems.append(f"{where} layers: {exc}")
    return score, problems


def _scenario_problems(where: str, e: _ScenarioEntry) -> tuple[ScenarioSpec | None, list[str]]:
    """The scenario (None if invalid) and the problems of one [[scenarios]] entry."""
    from ood_core.perturbations import PERTURBATIONS

    if (e.kind is None) == (e.dataset is None):
        both = "not both" if e.kind is not None else "one of them"
        return None, [
            f'{where}: give either kind = "..." (a perturbation of the InD test '
            f'images) or dataset = "..." (a dataset of real images), {both}'
        ]
    problems: list[str] = []
    if e.title is not None and not clean_title(e.title):
        problems.append(f"{where} title = {_show(e.title)}: expected a non-empty label")
    if e.kind is not None:
        if e.kind not in PERTURBATIONS:
            return None, problems + [
                f"{where} kind = {_show(e.kind)}: unknown perturbation{_suggest(e.kind, PERTURBATIONS)}; "
                f"available: {', '.join(PERTURBATIONS)}"
            ]
        declared = [p.name for p in PERTURBATIONS[e.kind].params] + ["seed"]
        problems += [
            f"{where} params.{k}: {e.kind} has no parameter {_show(k)}"
            f"{_suggest(k, declared)}; its parameters: {', '.join(declared)}"
            for k in e.params
            if k not in declared
        ]
        if not problems:
            try:
                make_perturbation(e.kind, **e.params)
            except (TypeError, ValueError) as exc:
                problems.append(f"{where} params: {exc}")
        if e.config is not None:
            problems.append(
                f"{where} config = {_show(e.config)}: only datasets have a config; remove it"
            )
        if e.split != "test":
            problems.append(
                f"{where} split = {_show(e.split)}: a perturbation applies to the InD "
                "test images; split is for datasets: remove it"
            )
    else:
        if e.params:
            problems.append(
                f"{where} params = {_show(e.params)}: only perturbations (kind = ...) "
                "take parameters; remove them"
            )
        bundled = data_mod.BUNDLED.get(e.dataset or "")
        if bundled is not None:
            if e.split not in bundled["splits"]:
                problems.append(
                    f"{where} split = {_show(e.split)}: bundled dataset "
                    f"{_show(e.dataset)} has the split(s) {', '.join(bundled['splits'])}"
                )
            if e.config is not None:
                problems.append(
                    f"{where} config = {_show(e.config)}: bundled dataset "
                    f"{_show(e.dataset)} has no configs; remove it"
                )
    if problems:
        return None, problems
    return ScenarioSpec(**e.model_dump()), []


def _check_config_dict(d: Any) -> tuple[RunConfig, list[str]]:
    """The config described by ``d`` (TOML layout) and every problem found in it."""
    if not isinstance(d, dict):
        return RunConfig(), [f"expected a table of sections, got {_kind(d)}"]
    if (deep := _nesting_problem(d)) is not None:
        return RunConfig(), [deep]
    problems: list[str] = []
    known = [*_SECTIONS, *_ENTRIES]
    unknown = [k for k in d if k not in known]
    if unknown:
        shown = unknown[:MAX_SHOWN_PROBLEMS]
        hints = "".join(
            _suggest(u, known).replace("?)", f" for {_show(u)}?)") for u in shown if len(u) <= 100
        )
        more = f" and {len(unknown) - len(shown):,} more" if len(unknown) > len(shown) else ""
        problems.append(
            f"Unknown section(s) {[_short_key(u) for u in shown]}{more} in the config{hints}; "
            f"expected {sorted(known)}"
        )
    sections: dict[str, Any] = {}
    for name, model in _SECTIONS.items():
        raw = d.get(name, {})
        if not isinstance(raw, dict):
            problems.append(
                f"[{name}] must be a table ([{name}] followed by key = value lines), "
                f"got {_show(raw)} ({_kind(raw)})"
            )
            continue
        try:
            sections[name] = model.model_validate(raw)
        except ValidationError as exc:
            problems += _explain(exc, f"[{name}]", model)
    entries: dict[str, list[Any] | None] = {}
    for name, model in _ENTRIES.items():
        raw = d.get(name, [])
        if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
            problems.append(
                f"{name} must be an array of tables ([[{name}]] entries), "
                f"got {_show(raw)} ({_kind(raw)})"
            )
            entries[name] = None
            continue
        entries[name] = []
        for i, e in enumerate(raw):
            label = (
                e.get("name")
                if name == "scores"
                else (e.get("title") or e.get("kind") or e.get("dataset"))
            )
            label = _short_key(label) if isinstance(label, str) else None
            where = f"[[{name}]] #{i + 1}" + (f" ({label})" if label else "")
            try:
                entries[name].append((where, model.model_validate(e)))
            except ValidationError as exc:
                problems += _explain(exc, where, model)
                entries[name].append((where, None))
    # per-entry checks against the registries
    scores: list[tuple[str, ScoreSpec, BaseScore | None]] = []
    for where, e in entries["scores"] or []:
        if e is not None:
            spec = ScoreSpec(e.name, dict(e.params), list(e.layers))
            score, probs = _score_problems(where, spec)
            problems += probs
            scores.append((where, spec, None if probs else score))
    scenarios: list[tuple[str, ScenarioSpec | None, str | None]] = []  # with the title as written
    for where, e in entries["scenarios"] or []:
        if e is not None:
            spec, probs = _scenario_problems(where, e)
            problems += probs
            scenarios.append((where, spec, e.title))
    # whole-config checks
    if entries["scores"] == []:
        problems.append(
            "[[scores]]: the config lists no scores; add at least one score "
            '([[scores]] with name = "Softmax", say)'
        )
    if entries["scenarios"] == []:
        problems.append(
            "[[scenarios]]: the config lists no scenarios; add at least one OoD "
            'scenario ([[scenarios]] with kind = "vertical_flip" or dataset = "mnist")'
        )
    first_of: dict[tuple, str] = {}
    for where, spec, score in scores:
        if score is None:
            continue
        if spec.key() in first_of:
            problems.append(
                f"{where} repeats {first_of[spec.key()]} (same name, parameters and "
                "layers): remove one"
            )
        first_of.setdefault(spec.key(), where)
    titled: dict[str, tuple[str, str]] = {}
    for where, spec, written in scenarios:
        if spec is None:
            continue
        title = spec.describe()
        text = written if written is not None else title
        norm = title_key(title)  # look-alikes (NFC/NFD, zero-width, spaces, case) are equal
        if norm == title_key(IND_TITLE):
            problems.append(
                f"{where}: the title {_show(text)}{_as_written([text], IND_TITLE)} is the "
                'in-distribution test set\'s label; set another title = "..."'
            )
        elif norm in titled:
            first, first_text = titled[norm]
            problems.append(
                f"{where} and {first} are both titled {_show(text)}"
                f"{_as_written([text, first_text])}: results are reported per title, so give "
                'each a distinct title = "..."'
            )
        titled.setdefault(norm, (where, text))
    data, ev = sections.get("data"), sections.get("evaluation")
    if data is not None and data.ind_dataset in data_mod.BUNDLED:
        splits = data_mod.BUNDLED[data.ind_dataset]["splits"]
        for key in ("calibration_split", "test_split"):
            if getattr(data, key) not in splits:
                problems.append(
                    f"[data] {key} = {_show(getattr(data, key))}: bundled dataset "
                    f"{_show(data.ind_dataset)} has the split(s) {', '.join(splits)}"
                )
    baseline = None
    if ev is not None:
        seen: dict[str, int] = {}
        for k, text in enumerate(ev.metrics):
            try:
                norm = repr(parse_metric(text))
            except ValueError as exc:
                problems.append(f"[evaluation] metrics[{k}] = {_show(text)}: {exc}")
                continue
            if norm in seen:
                problems.append(
                    f"[evaluation] metrics[{k}] = {_show(text)}: already listed as "
                    f"metrics[{seen[norm]}]; remove one"
                )
            seen.setdefault(norm, k)
        if ev.baseline is not None and entries["scores"] and len(scores) == len(entries["scores"]):
            baseline, problem = _resolve_baseline(ev.baseline, scores)
            if problem:
                problems.append(problem)
    model = sections.get("model", _ModelSection())
    output = model.output
    if output is not None and (
        (isinstance(output, int) and output < 0)
        or (isinstance(output, str) and not 1 <= len(output.strip()) <= MAX_OUTPUT_KEY)
    ):
        problems.append(
            f"[model] output = {_show(output)} ({_kind(output)}): expected "
            f"{_ModelSection.model_fields['output'].description}"
        )
        output = None
    data = data or _DataSection()
    ev = ev or _EvaluationSection()
    execution = sections.get("execution") or _ExecutionSection()
    problems += _execution_problems(execution)
    config = RunConfig(
        model_repo=model.repo,
        model_entry=model.entry,
        trust_repo=False,  # a file never grants trust: only the caller does
        trust_requested=model.trust_repo,
        output=output,
        ind_dataset=data.ind_dataset,
        calibration_split=data.calibration_split,
        test_split=data.test_split,
        n_calibration=data.n_calibration,
        n_test=data.n_test,
        seed=data.seed,
        streaming=data.streaming,
        scores=[spec for _, spec, _ in scores],
        scenarios=[s for _, s, _ in scenarios if s is not None],
        metrics=list(ev.metrics),
        baseline=baseline,
        n_boot=ev.n_boot,
        batch_size=ev.batch_size,
        executor=execution.executor,
        address=execution.address.strip(),
        workers=execution.workers,
        device=execution.device,
        amp=execution.amp if isinstance(execution.amp, str) else None,
    )
    return config, problems


def _execution_problems(e: _ExecutionSection) -> list[str]:
    """Problems of an ``[execution]`` table that its types allow: a malformed device, fp16 on
    the CPU, Ray settings with the local executor. Whether this machine has the device is
    checked when the run starts (:func:`ood_core.devices.resolve_device`): a config may be
    written for another machine."""
    problems: list[str] = []
    if e.amp is True:  # a boolean only switches AMP off: which precision is a choice
        problems.append(
            f"[execution] amp = {_show(e.amp)} ({_kind(e.amp)}): expected "
            f"{_ExecutionSection.model_fields['amp'].description}"
        )
    try:
        check_device_spec(e.device)
    except DeviceError:
        problems.append(
            f"[execution] device = {_show(e.device)}: expected "
            f"{_ExecutionSection.model_fields['device'].description}"
        )
    if e.amp == "fp16" and e.device == "cpu":
        problems.append(
            '[execution] amp = "fp16": float16 autocast needs a CUDA device, not device = "cpu" '
            '(use amp = "bf16" on the CPU)'
        )
    if e.executor == "local":
        if e.address.strip():
            problems.append(
                f"[execution] address = {_show(e.address)}: an address is for executor = "
                '"ray"; set executor = "ray" or remove address'
            )
        if e.workers != EXECUTION_DEFAULTS["workers"]:
            problems.append(
                f"[execution] workers = {e.workers}: workers are Ray actors, for executor = "
                '"ray"; set executor = "ray" or remove workers'
            )
    return problems


def _resolve_baseline(
    value: int | str, scores: list[tuple[str, ScoreSpec, BaseScore | None]]
) -> tuple[int | None, str | None]:
    """The baseline's index: ``value`` is an index or a score name (registry name, or its label
    with or without layers, e.g. ``"KNN(k=15)"``); the first match wins."""
    n = len(scores)
    expected = f"expected the index (0 to {n - 1}) or the name of one of the {n} [[scores]]"
    if isinstance(value, int):
        if 0 <= value < n:
            return value, None
        return None, f"[evaluation] baseline = {value}: {expected}"
    from ood_core.scores import ALIASES

    value = relabelled(value)
    names: list[str] = []
    for i, (_, spec, score) in enumerate(scores):
        candidates = [spec.name, ALIASES.get(spec.name, spec.name)]
        if score is not None:
            candidates += [repr(score), score_label(score, spec.layer_ids(), multiline=False)]
        if value in candidates:
            return i, None
        names += candidates
    return (
        None,
        f"[evaluation] baseline = {_show(value)}: no such score{_suggest(value, names)}; {expected}",
    )


def relabelled(value: Any) -> Any:
    """``"KNN(k=5) @ (1, 5), (1, 11)"`` (the notation of earlier exports) -> ``"KNN(k=5) @ 1-5, 1-11"``."""
    if not isinstance(value, str) or " @ " not in value:
        return value
    name, _, layers = value.rpartition(" @ ")
    try:
        ids = parse_layer_ids(re.findall(r"\(\s*\d+\s*,\s*\d+\s*\)|\d+-\d+", layers))
    except ValueError:
        return value
    return f"{name} @ {layers_text(ids)}" if ids else value


def example_config() -> RunConfig:
    """The seed tutorial's workload on the bundled default, plus real MNIST digits."""
    return RunConfig(
        scores=[
            ScoreSpec("Softmax"),
            ScoreSpec("GradNorm", layers=["1-12"]),
            ScoreSpec("Gram", layers=["1-5", "1-11", "1-12"]),
            ScoreSpec("KNN", {"k": 15}, ["1-11"]),
        ],
        scenarios=[
            ScenarioSpec(kind="vertical_flip"),
            ScenarioSpec(kind="darker", params={"factor": 0.5}),
            ScenarioSpec(kind="uniform_noise"),
            ScenarioSpec(dataset="mnist"),
        ],
    )
