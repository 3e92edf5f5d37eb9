"""One recipe object: every option of a prune, checked in one place, its method's defaults resolved in one place, and
exactly what hywia.json records and `hywia prune --recipe` replays.

As PEFT's `LoraConfig` goes to `get_peft_model(model, config)`, a `Recipe` goes to `hywia.prune(model, tokenizer,
recipe)`; the command line builds one from its flags (`Recipe.from_args`), and a saved model's hywia.json holds the
resolved one (`Recipe.load`). A field left None means "the method's own default": `resolved()` fills every such field
with the value the run will use, so a recipe saved after a prune replays the same model even after a default changes.
The model, its dtype and device, the data folder and the output are not part of a recipe: they say where a prune
runs, not what it does.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .allocate import check_ratio_and_scope
from .errors import HywiaError
from .grouping import ATTENTION_UNITS
from .importance import CRITERIA, Criterion, Memory, get_criterion
from .options import RANGES, check_fields, check_values, flag, read_record
from .sparsify import SPARSIFIERS, check_options as check_sparsity
from .split import JUDGED_SPLITS, REFIT_SPLITS, check_split

STRUCTURED_ONLY = ("ratio", "scope", "target", "layers", "min_keep", "round_to", "fusion", "alpha", "fusion_dim", "normalize",
                   "attention_unit", "kind_split", "compensate", "reconstruct", "reconstruct_samples", "judge_samples",
                   "judge_calib", "layers_per_pass", "stats_dtype", "stats_device", "stats_store")
UNSTRUCTURED_ONLY = ("sparsity", "pattern", "granularity", "sensitivity_samples", "wbits")
STRUCTURED_DEFAULTS = {"calib": "wikitext2", "samples": 10, "seq_len": 128, "batch_size": 4, "target": "both", "round_to": 1,
                       "min_keep": 1, "stats_dtype": "float32", "reconstruct_samples": 128, "judge_samples": 100}
UNSTRUCTURED_DEFAULTS = {"calib": "c4", "samples": 128, "seq_len": 2048, "batch_size": 1}
METHOD_OPTIONS = {"structured": ("fusion", "alpha", "fusion_dim", "normalize", "spread"),
                  "unstructured": ("spread", "granularity", "sensitivity_samples", "wbits")}
YES_NO = {"yes": True, "no": False}  # --compensate and --reconstruct on the command line and in older recipes
RECONSTRUCT = {None: None, "yes": True, "no": False, "obs": "obs"}  # --reconstruct -> Recipe.reconstruct
RUN_SETTINGS = ("model", "dtype", "device", "data_dir")  # recorded beside a recipe, not in it
JUDGE_CALIB_FIX = ("add it, name another text with --judge-calib, or judge on the calibration text alone with "
                   "--judge-calib none")  # the fix for a --judge-calib text that cannot be read, CLI and API alike


@dataclass
class Recipe:
    """Every option of a prune (None: the method's own default; see `hywia prune --help` for each one's meaning)."""

    method: str = "hywia-adaptive"
    ratio: float | None = None  # structured: fraction of the prunable parameters removed
    sparsity: float | None = None  # unstructured: fraction of the decoder weights zeroed
    pattern: str | None = None  # unstructured: N:M
    calib: str | None = None  # dataset name or file (the Python API also takes token ids [n, seq_len])
    samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    batch_size: int | None = None
    scope: str | None = None
    target: str | None = None
    layers: str | None = None
    attention_unit: str | None = None
    kind_split: str | float | None = None
    compensate: bool | None = None
    reconstruct: bool | str | None = None
    reconstruct_samples: int | None = None
    judge_samples: int | None = None
    judge_calib: str | None = None  # evidence-best's second judge text ("none": the calibration text only)
    min_keep: int | None = None
    round_to: int | None = None
    fusion: str | None = None
    alpha: float | None = None
    fusion_dim: int | None = None
    normalize: str | None = None
    spread: float | None = None
    granularity: str | None = None
    sensitivity_samples: int | None = None
    wbits: int | None = None
    layers_per_pass: int | None = None
    stats_dtype: str | None = None
    stats_device: str | None = None
    stats_store: str | None = None
    checkpointing: bool = False
    sequential: bool = False

    @property
    def unstructured(self) -> bool:
        return self.method in SPARSIFIERS

    @property
    def criterion(self) -> Criterion:
        return get_criterion(self.method, self.method_options)

    @property
    def method_options(self) -> dict:
        """The options that go to the method itself (None left out)."""
        names = METHOD_OPTIONS["unstructured" if self.unstructured else "structured"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def memory(self, device: str | None = None) -> Memory:
        """How statistics are gathered (`device`: where a sequential walk moves each layer)."""
        return Memory(layers_per_pass=self.layers_per_pass, store_dtype=self.stats_dtype or "float32",
                      store=self.stats_store or "weights", store_device=self.stats_device, checkpointing=self.checkpointing,
                      sequential=self.sequential, device=device)

    def check(self) -> Recipe:
        """Refuse the first option that is wrong by itself or with the others, naming it as its flag; nothing is
        loaded. Returns the recipe, so `Recipe(...).check()` reads as one step."""
        if self.method not in CRITERIA and not self.unstructured:
            raise HywiaError(f"unknown method '{self.method}': structured: {', '.join(CRITERIA)}; unstructured: {', '.join(SPARSIFIERS)}")
        names, kind = (STRUCTURED_ONLY, "unstructured") if self.unstructured else (UNSTRUCTURED_ONLY, "structured")
        given = [n for n in names if getattr(self, n) is not None]
        if given:
            fix = "it takes --sparsity or --pattern" if self.unstructured else "it takes --ratio"
            raise HywiaError(f"{flag(given[0])} does not apply to --method {self.method}, which is {kind} pruning ({fix})")
        check_values(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in RANGES})
        if self.unstructured:
            check_sparsity(self.method, self.sparsity, self.pattern, self.method_options)
        else:
            self._check_structured()
        return self

    def _check_structured(self) -> None:
        if self.ratio is None:
            raise HywiaError(f"--method {self.method} needs --ratio (fraction of prunable parameters to remove, e.g. 0.2)")
        if self.reconstruct not in (None, True, False, "obs"):
            raise HywiaError(f"unknown --reconstruct '{self.reconstruct}': use yes (refit the kept weights), obs (OBS chooses "
                             "the groups too) or no")
        if self.attention_unit is not None and self.attention_unit not in ATTENTION_UNITS:
            raise HywiaError(f"unknown --attention-unit '{self.attention_unit}': use kv (whole KV groups) or query (query heads, "
                             "balanced per KV group)")
        criterion = self.criterion
        if criterion.select is not None and self.reconstruct is False:
            raise HywiaError(f"--method {self.method} chooses its groups during its reconstruction walk: leave out --reconstruct no")
        scope = self.scope or criterion.scope
        check_ratio_and_scope(self.ratio, scope)
        refits = criterion.reconstructs if self.reconstruct is None else self.reconstruct
        kind_split = own_split(criterion, self.reconstruct) if self.kind_split is None else self.kind_split
        check_split(kind_split, scope)
        if kind_split in REFIT_SPLITS and not refits:
            raise HywiaError(f"--kind-split {kind_split} weighs candidates as reconstruction builds them: add --reconstruct obs "
                             "(or yes), or use --kind-split evidence")
        if self.reconstruct_samples is not None and not refits:
            raise HywiaError(f"--reconstruct-samples sets the windows a reconstruction fits on, and --method {self.method} does "
                             "not reconstruct here: add --reconstruct obs (or yes), or leave --reconstruct-samples out")
        for name in ("judge_samples", "judge_calib"):
            if getattr(self, name) is not None and kind_split not in JUDGED_SPLITS:
                raise HywiaError(f"{flag(name)} sets how --kind-split evidence-best or evidence-both judges its two models: add "
                                 f"--kind-split evidence-best, or leave {flag(name)} out")
        calib = STRUCTURED_DEFAULTS["calib"] if self.calib is None else self.calib
        if self.judge_calib is not None and isinstance(calib, str) and self.judge_calib == calib:
            raise HywiaError(f"--judge-calib {self.judge_calib} is the calibration text already: name a second text (c4, "
                             "wikitext2, ptb or a file), or none to judge on the calibration text alone")
        if (self.target or "both") not in ("attention", "mlp", "both"):
            raise HywiaError(f"unknown target '{self.target}': use attention, mlp or both")
        self.memory().check()
        if self.stats_store == "groups" and not criterion.group_sums:
            takes = ", ".join(name for name, c in CRITERIA.items() if c.group_sums)
            raise HywiaError(f"--stats-store groups keeps per-group sums of w*g and w^2*F, and --method {self.method} reads "
                             f"per-weight statistics: leave it out (it applies to {takes})")

    def resolved(self, grouped_query: bool = True) -> Recipe:
        """This recipe with every default filled in as the run uses it (`grouped_query`: whether the model has query
        heads to prune on their own; it decides the default attention unit)."""
        filled = {k: v for k, v in (UNSTRUCTURED_DEFAULTS if self.unstructured else STRUCTURED_DEFAULTS).items()
                  if getattr(self, k) is None}
        if not self.unstructured:
            criterion = self.criterion
            reconstruct = criterion.reconstructs if self.reconstruct is None else self.reconstruct
            own = {"scope": criterion.scope, "compensate": criterion.compensates, "reconstruct": reconstruct,
                   "kind_split": own_split(criterion, self.reconstruct),
                   "attention_unit": criterion.attention_unit if grouped_query else "kv",
                   "stats_store": criterion.store if self.stats_dtype in (None, "float32") else "weights"}
            filled.update({k: v for k, v in own.items() if getattr(self, k) is None})
            if not filled.get("reconstruct", reconstruct):  # counts that would change nothing stay unset, as check() wants
                filled.pop("reconstruct_samples", None)
            if filled.get("kind_split", self.kind_split) not in JUDGED_SPLITS:
                filled.pop("judge_samples", None)
            elif self.judge_calib is None:
                filled["judge_calib"] = second_text(filled.get("calib", self.calib))
        return replace(self, **filled)

    def as_dict(self) -> dict:
        """The recipe as hywia.json records it (token ids given as calibration are recorded by their shape)."""
        record = asdict(self)
        if not isinstance(record["calib"], (str, type(None))):
            record["calib"] = f"token ids {list(record['calib'].shape)}"
        return record

    @classmethod
    def from_dict(cls, values: dict, where: str = "recipe", key: str = "recipe") -> Recipe:
        """A recipe from recorded values, each field checked for its name and type (one line naming `where` and the
        field); the values themselves are checked by `check()`."""
        check_fields(cls, values, where, key)
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Recipe:
        """The recipe a `hywia prune` command line gives (flags not given stay None)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["compensate"] = YES_NO.get(values.get("compensate"), values.get("compensate"))
        values["reconstruct"] = RECONSTRUCT.get(values.get("reconstruct"), values.get("reconstruct"))
        return cls(**values)

    def as_flags(self) -> dict:
        """The recipe as `hywia prune`'s flags hold it (yes/no for the switches that take a word)."""
        words = {True: "yes", False: "no"}
        record = self.as_dict()
        for name in ("compensate", "reconstruct"):
            if isinstance(record[name], bool):
                record[name] = words[record[name]]
        if record["kind_split"] is not None:
            record["kind_split"] = str(record["kind_split"])
        return record

    @classmethod
    def load(cls, path: str | Path) -> tuple[Recipe, dict]:
        """The recipe a saved model's hywia.json records, and the run settings beside it (RUN_SETTINGS). Files written
        before recipes had their own field hold the command line's options instead; those are read as such."""
        where = f"--recipe {path}"
        recorded = read_record(path, "pruned")
        if not isinstance(recorded, dict) or not ("recipe" in recorded or "options" in recorded):
            raise HywiaError(f"{where} is not a hywia.json with a recorded recipe (models pruned before recipes were recorded "
                             "have none): give the hywia.json of a model this hywia pruned")
        if "recipe" in recorded:
            settings = {k: recorded[k] for k in RUN_SETTINGS if recorded.get(k) is not None}
            _check_settings(settings, where)
            if recorded.get("base_model"):  # a recovered model's record: the prune started from the dense model
                settings["model"] = recorded["base_model"]
            return _judged_as_recorded(cls.from_dict(recorded["recipe"], where), recorded["recipe"]), settings
        recipe, settings = _from_options(recorded, where)
        return _judged_as_recorded(recipe, recorded["options"]), settings


def recipe_with(recipe: Recipe | None, options: dict, defaults: dict) -> Recipe:
    """`recipe`, or a new one from `defaults` (the keyword API's: a ratio of 0.2 for `hywia.prune`, SparseGPT at 50%
    for `hywia.sparsify`), with keyword `options` applied over it; `memory=Memory(...)` stands for its six fields.
    An option that is no field of Recipe is refused by name."""
    options = {k: v for k, v in options.items() if v is not None}
    memory = options.pop("memory", None)
    if memory is not None:
        options.update(layers_per_pass=memory.layers_per_pass, stats_dtype=memory.store_dtype, stats_store=memory.store,
                       stats_device=memory.store_device,
                       checkpointing=memory.checkpointing, sequential=memory.sequential)
    unknown = sorted(set(options) - {f.name for f in fields(Recipe)})
    if unknown:
        raise HywiaError(f"unknown prune option '{unknown[0]}': a prune's options are hywia.Recipe's fields")
    if recipe is None:
        return Recipe(**{**defaults, **options})
    return replace(recipe, **options)


def second_text(calib: object) -> str:
    """evidence-best's default second judge text: C4 (general web text) beside a calibration text that is not C4,
    WikiText-2 beside C4; "none" where calibration came as token ids (no text to draw a second one beside)."""
    if not isinstance(calib, str):
        return "none"
    return "wikitext2" if calib == "c4" else "c4"


def _check_settings(settings: dict, where: str) -> None:
    """The run settings recorded beside a recipe (model, dtype, device, data dir) are names or paths: text."""
    for name, value in settings.items():
        if value is not None and not isinstance(value, str):
            raise HywiaError(f"{where}: '{name}' is {json.dumps(value)}, not a name or path; give the {name} as text, "
                             f"or pass --{name.replace('_', '-')} on the command line")


def _judged_as_recorded(recipe: Recipe, recorded: dict) -> Recipe:
    """A recipe recorded before the judge read a second text judged on its calibration text alone: replay it so."""
    if "judge_calib" not in recorded and recipe.kind_split == "evidence-best":
        return replace(recipe, judge_calib="none")
    return recipe


def own_split(criterion: Criterion, reconstruct: bool | str | None) -> str:
    """The criterion's default kind split for this run: a split that weighs refit candidates (hywia-adaptive's
    evidence-best) falls back to "evidence" where the run does not reconstruct, so `--reconstruct no` alone gives the
    choose-only method back."""
    refits = criterion.reconstructs if reconstruct is None else reconstruct
    return criterion.kind_split if refits or criterion.kind_split not in REFIT_SPLITS else "evidence"


def _from_options(recorded: dict, where: str) -> tuple[Recipe, dict]:
    """A recipe from an older hywia.json's `options` (the command line's values, yes/no words, run settings mixed in),
    its method defaults pinned to what the run recorded it resolved them to."""
    options = recorded["options"]
    if not isinstance(options, dict):
        raise HywiaError(f"{where}: 'options' is not an object of option names and values; give a hywia.json hywia wrote")
    settings = {k: options[k] for k in RUN_SETTINGS if k in options}
    _check_settings(settings, where)
    values = {k: v for k, v in options.items() if k not in RUN_SETTINGS}
    for name in ("compensate", "reconstruct"):
        if isinstance(values.get(name), str) and values[name] in YES_NO:
            values[name] = YES_NO[values[name]]
    extra = recorded.get("extra") if isinstance(recorded.get("extra"), dict) else {}
    resolved = {"scope": recorded.get("scope"), "attention_unit": extra.get("attention_unit"), "kind_split": extra.get("kind_split"),
                "compensate": extra.get("compensate"), "reconstruct": extra.get("reconstruct")}
    values.update({k: v for k, v in resolved.items() if values.get(k) is None and v is not None})
    if values.get("checkpointing") is None:
        values.pop("checkpointing", None)
    if values.get("sequential") is None:
        values.pop("sequential", None)
    return Recipe.from_dict(values, where, "options"), settings
