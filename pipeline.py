"""`project.yaml`: load and validate a pipeline, and plan the jobs a request creates.

Validation follows the OpenSAFELY pipeline library (versions 1 to 5 and their
version-dependent rules) and adds what it lacks: every problem of a file is reported
together, and dependency cycles are errors. YAML is read with the YAML 1.2 core schema,
as the OpenSAFELY library does, so `on`, `yes` and `no` stay strings and `010` is ten.

Pure functions over text and plain data: no files, no database, no Docker.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import math
import posixpath
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from .states import ACTIVE_STATES

RUN_ALL = "run_all"
LATEST_VERSION = 5

HIGHLY_SENSITIVE = "highly_sensitive"
MODERATELY_SENSITIVE = "moderately_sensitive"
MINIMALLY_SENSITIVE = "minimally_sensitive"
PRIVACY_LEVELS = (HIGHLY_SENSITIVE, MODERATELY_SENSITIVE, MINIMALLY_SENSITIVE)

# File types that may be released from the secure environment as moderately_sensitive.
MODERATELY_SENSITIVE_FILE_TYPES = frozenset(
    {".csv", ".jpg", ".jpeg", ".png", ".svg", ".svgz", ".html", ".txt", ".log", ".json", ".md"}
)

PROJECT_KEYS = ("version", "actions", "expectations")
ACTION_KEYS = ("run", "needs", "outputs", "config", "dummy_data_file")

# Version rules: the first version a rule applies to, and the last (None: still applies).
_RULE_VERSIONS = {
    "unique_output_paths": (2, None),
    "expectations_required": (3, 3),
    "no_cohortextractor": (4, None),
    "run_all_reserved": (5, None),
    "no_latest_tag": (5, None),
}

# `dev` is for local testing and `-pre` for pre-releases; `latest` is refused from version 5.
_TAG = re.compile(r"v[\d.]+(-pre)?|dev|latest")
_COHORTEXTRACTOR_GENERATE_COHORT = re.compile(r"cohortextractor:\S+ generate_cohort")
_EHRQL_GENERATE = re.compile(r"(ehrql|databuilder):\S+ (generate[-_](dataset|measures))")

# Commands given database access, by image; "*" means every command of that image.
_DATABASE_COMMANDS: dict[str, tuple[str, ...] | str] = {
    "ehrql": ("generate-dataset", "generate-measures"),
    "sqlrunner": "*",
    "cohortextractor": ("generate_cohort", "generate_codelist_report"),
    "databuilder": ("generate-dataset",),
}

# Images whose tags are due to be withdrawn: worth a warning, still valid.
_DEPRECATED_SOON = {("python", "v1"), ("r", "v1")}

# YAML aliases can make a small file describe a huge config; stop walking it past this.
_MAX_CONFIG_VALUES = 100_000


class ProjectValidationError(Exception):
    """project.yaml is invalid; `.errors` lists every problem found, one sentence each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class UnknownActionError(ValueError):
    """A request named an action the pipeline does not have (or named none)."""


@dataclass(frozen=True)
class Action:
    """One validated action of project.yaml."""

    name: str
    run: str
    image: str
    tag: str
    args: tuple[str, ...]
    needs: tuple[str, ...]
    outputs: dict[str, dict[str, str]]
    config: dict | None
    is_database_action: bool

    def output_patterns(self) -> list[tuple[str, str]]:
        """Every output pattern with its privacy level, in file order."""
        return _patterns(self.outputs)


@dataclass(frozen=True)
class Pipeline:
    """A validated project.yaml."""

    version: float
    actions: dict[str, Action]
    warnings: tuple[str, ...] = ()


# a Pipeline is never changed once made, and the site parses the same file at every submit:
# the same text gives the same (shared) Pipeline, parsed once
@functools.lru_cache(maxsize=64)
def load_pipeline(text: str) -> Pipeline:
    """Parse and validate project.yaml text; raise ProjectValidationError listing every problem."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise ProjectValidationError([_describe_yaml_error(exc)]) from None
    except yaml.YAMLError as exc:
        raise ProjectValidationError(
            [f"project.yaml is not valid YAML: {_one_line(exc)}"]
        ) from None
    except RecursionError:
        raise ProjectValidationError(
            ["project.yaml is not valid: it is nested too deeply."]
        ) from None
    except UnicodeError as exc:
        raise ProjectValidationError([f"project.yaml is not valid text: {exc}."]) from None
    return _Validator(data).pipeline()


# --- YAML -------------------------------------------------------------------------------


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when built
    """PyYAML's safe loader with YAML 1.2 core schema scalars and duplicate keys refused."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node:
                raise _DuplicateKeyError(key, first, key_node)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        try:
            return int(text, 0) if text.lstrip("+-")[:2] in ("0o", "0x") else int(text, 10)
        except ValueError:
            problem = f"{text!r} is not an integer"
            raise ConstructorError(None, None, problem, node.start_mark) from None

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> bool:
        text = self.construct_scalar(node)
        if text.lower() not in ("true", "false"):
            raise ConstructorError(None, None, f"{text!r} is not true or false", node.start_mark)
        return text.lower() == "true"

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = self.construct_scalar(node)
        special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
        try:
            return special.get(text.lower()) or float(text)
        except ValueError:
            problem = f"{text!r} is not a number"
            raise ConstructorError(None, None, problem, node.start_mark) from None


class _DuplicateKeyError(yaml.MarkedYAMLError):
    def __init__(self, key: Any, first: yaml.Node, again: yaml.Node) -> None:
        super().__init__(problem_mark=again.start_mark)
        self.key = key
        self.first_line = first.start_mark.line + 1


for _tag, _pattern, _first in [
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (
        "float",
        r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
        "-+.0123456789",
    ),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("merge", r"<<", "<"),
]:
    _Loader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first)
    )
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
_Loader.add_constructor("tag:yaml.org,2002:bool", _Loader.construct_yaml_bool)
# Dates stay text, so that a config holding one can still be passed on as JSON.
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_str)


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown place"
    if isinstance(exc, _DuplicateKeyError):
        return (
            f"project.yaml has the key {str(exc.key)!r} twice in one mapping, on line "
            f"{exc.first_line} and on line {mark.line + 1}: each key may appear only once."
        )
    message = f"project.yaml is not valid YAML: {exc.problem} at {where}"
    if exc.context and exc.context_mark:
        message += f" ({exc.context} on line {exc.context_mark.line + 1})"
    return message + "."


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


# --- validation -------------------------------------------------------------------------


@dataclass
class _Validator:
    """Checks parsed project.yaml data, collecting every problem rather than the first."""

    data: Any
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    version: float | None = None

    def pipeline(self) -> Pipeline:
        data = self.data
        if not isinstance(data, dict):
            what = "empty" if data is None else f"a {_kind(data)}"
            raise ProjectValidationError(
                [f"project.yaml must be a mapping with `version` and `actions`, but it is {what}."]
            )
        unexpected = [str(key) for key in data if key not in PROJECT_KEYS]
        if unexpected:
            self.errors.append(
                f"project.yaml has unexpected top-level key(s): {', '.join(unexpected)}. "
                f"The allowed keys are: {', '.join(PROJECT_KEYS)}."
            )
        self.version = self._check_version(data.get("version"))
        actions = self._check_actions(data.get("actions"))
        self._check_expectations(data.get("expectations"))
        if self.errors:
            raise ProjectValidationError(self.errors)
        assert self.version is not None
        return Pipeline(self.version, actions, tuple(self.warnings))

    def applies(self, rule: str) -> bool:
        """Whether a version-dependent rule applies; none does when the version is unusable."""
        if self.version is None:
            return False
        first, last = _RULE_VERSIONS[rule]
        return first <= self.version and (last is None or self.version <= last)

    def _check_version(self, version: Any) -> float | None:
        if version is None:
            self.errors.append(
                "project.yaml must have a `version` saying which version of the format it "
                f"uses (the latest is {LATEST_VERSION})."
            )
            return None
        number: float | None = None
        if isinstance(version, int | float) and not isinstance(version, bool):
            number = version
        elif isinstance(version, str):
            try:
                number = float(version)
            except ValueError:
                pass
        if number is None or not 1 <= number <= LATEST_VERSION:
            self.errors.append(
                f"`version` must be a number between 1 and {LATEST_VERSION}, but it is {version!r}."
            )
            return None
        if number != LATEST_VERSION:
            self.warnings.append(
                f"project.yaml uses version {version}; the latest version is {LATEST_VERSION}. "
                "Consider updating it."
            )
        return number

    def _check_actions(self, actions: Any) -> dict[str, Action]:
        if not isinstance(actions, dict):
            if actions is None:
                self.errors.append("project.yaml must have an `actions` section.")
            else:
                self.errors.append(
                    f"The `actions` section must be a mapping of action names to actions, "
                    f"but it is a {_kind(actions)}."
                )
            return {}
        specs = {str(name): spec for name, spec in actions.items()}
        if RUN_ALL in specs:
            if self.applies("run_all_reserved"):
                self.errors.append(
                    f"`{RUN_ALL}` is a reserved action name (it runs every action): rename "
                    "that action."
                )
            elif self.version is not None:
                self.warnings.append(
                    f"The action `{RUN_ALL}` is ignored: `{RUN_ALL}` is a reserved name that "
                    "runs every action, and from version 5 it is an error. Rename that action."
                )
        known = [name for name in specs if name != RUN_ALL]
        built: dict[str, Action] = {}
        for name, spec in specs.items():
            action = _ActionChecker(self, name, spec, known).check()
            if action is not None:
                built[name] = action
        self._check_duplicate_runs(specs)
        if self.applies("unique_output_paths"):
            self._check_unique_outputs(built.values())  # an ignored `run_all` counts here too
        built.pop(RUN_ALL, None)
        self._check_cycles(built)
        return built

    def _check_duplicate_runs(self, specs: dict[str, Any]) -> None:
        first_with_run: dict[str, str] = {}
        for name, spec in specs.items():
            run = spec.get("run") if isinstance(spec, dict) else None
            if not isinstance(run, str):
                continue
            first = first_with_run.setdefault(run, name)
            if first != name:
                self.errors.append(
                    f"Action `{name}` has the same `run` command as action `{first}`: each "
                    "action must run something different."
                )

    def _check_unique_outputs(self, actions: Iterable[Action]) -> None:
        users: dict[str, list[str]] = {}
        for action in actions:
            for _, pattern in action.output_patterns():
                users.setdefault(pattern, []).append(action.name)
        for pattern, names in users.items():
            if len(names) > 1:
                self.errors.append(
                    f"Output path {pattern} is not unique: it is an output of "
                    f"{_action_list(names)}. Each output path may be used only once."
                )

    def _check_cycles(self, actions: dict[str, Action]) -> None:
        state: dict[str, str] = {}  # "visiting" or "done"
        for start in actions:
            if start in state:
                continue
            path = [start]
            state[start] = "visiting"
            stack: list[Iterator[str]] = [iter(actions[start].needs)]
            while stack:
                need = next(stack[-1], None)
                if need is None:
                    stack.pop()
                    state[path.pop()] = "done"
                elif need not in actions or state.get(need) == "done":
                    continue
                elif state.get(need) == "visiting":
                    self._report_cycle([*path[path.index(need) :], need])
                else:
                    state[need] = "visiting"
                    path.append(need)
                    stack.append(iter(actions[need].needs))

    def _report_cycle(self, cycle: list[str]) -> None:
        if len(cycle) == 2:
            self.errors.append(f"Action `{cycle[0]}` needs itself: remove it from its `needs`.")
        else:
            self.errors.append(
                f"Actions depend on each other in a cycle: {' -> '.join(cycle)}. Remove one "
                "of these `needs` so the actions can run in order."
            )

    def _check_expectations(self, expectations: Any) -> None:
        if self.applies("no_cohortextractor"):
            if expectations is not None:
                self.errors.append(
                    "project.yaml has an `expectations` section, which is not supported from "
                    "version 4: it only applied to cohortextractor actions, so remove it."
                )
        elif self.applies("expectations_required"):
            if expectations is None:
                self.errors.append(
                    "project.yaml version 3 must have an `expectations` section with "
                    "`population_size` (for example `expectations: {population_size: 1000}`)."
                )
            elif not isinstance(expectations, dict):
                self.errors.append(
                    "The `expectations` section must be a mapping with `population_size`."
                )
            else:
                unexpected = [str(key) for key in expectations if key != "population_size"]
                if unexpected:
                    self.errors.append(
                        f"The `expectations` section has unexpected key(s): "
                        f"{', '.join(unexpected)}. Only `population_size` is allowed."
                    )
                if "population_size" not in expectations:
                    self.errors.append("The `expectations` section must have `population_size`.")
                elif not _is_integer_like(expectations["population_size"]):
                    self.errors.append(
                        "`population_size` in the `expectations` section must be a number."
                    )


@dataclass
class _ActionChecker:
    """Checks one action, adding its problems to the validator's list."""

    validator: _Validator
    name: str
    spec: Any
    known: list[str]
    ok: bool = True

    def error(self, message: str) -> None:
        self.ok = False
        self.validator.errors.append(message)

    def check(self) -> Action | None:
        name, spec = self.name, self.spec
        if not isinstance(spec, dict):
            self.error(
                f"Action `{name}` must be a mapping with `run` and `outputs`, but it is "
                f"{'empty' if spec is None else 'a ' + _kind(spec)}."
            )
            return None
        unexpected = [str(key) for key in spec if key not in ACTION_KEYS]
        if unexpected:
            self.error(
                f"Action `{name}` has unexpected key(s): {', '.join(unexpected)}. The allowed "
                f"keys are: {', '.join(ACTION_KEYS)}."
            )
        for key in ("run", "outputs"):
            if key not in spec:
                self.error(
                    f"Action `{name}` has no `{key}`: every action needs `run` and `outputs`."
                )
        parts = self._check_run(spec.get("run")) if "run" in spec else None
        needs = self._check_needs(spec.get("needs"))
        outputs = self._check_outputs(spec.get("outputs")) if "outputs" in spec else None
        config_json = self._check_config(spec.get("config"))
        dummy_data_file = spec.get("dummy_data_file")
        if dummy_data_file is not None and not isinstance(dummy_data_file, str):
            self.error(f"`dummy_data_file` of action `{name}` must be a string (a file path).")
        run = " ".join(spec["run"].split()) if parts is not None else ""
        if parts is not None and outputs is not None:
            self._check_command_outputs(run, parts, outputs)
        if not self.ok or parts is None or outputs is None:
            return None
        image, _, tag = parts[0].partition(":")
        config = spec.get("config")
        args = tuple(parts[1:])
        if config:
            args += ("--config", config_json)
        return Action(
            name=name,
            run=run,
            image=image,
            tag=tag,
            args=args,
            needs=needs,
            outputs=outputs,
            config=config,
            is_database_action=_is_database_action(parts),
        )

    def _check_run(self, run: Any) -> list[str] | None:
        name = self.name
        if not isinstance(run, str):
            self.error(
                f"`run` of action `{name}` must be a string, like `python:v2 analysis/x.py`."
            )
            return None
        try:
            parts = shlex.split(run)
        except ValueError as exc:
            self.error(f"`run` of action `{name}` cannot be split into arguments: {exc}.")
            return None
        if not parts:
            self.error(f"`run` of action `{name}` is empty: it must name an image and a version.")
            return None
        image, _, tag = parts[0].partition(":")
        if not image or not _TAG.fullmatch(tag):
            shown = image or "IMAGE"
            self.error(
                f"`run` of action `{name}` must start with an image and its version, in the "
                f"form {shown}:vN (e.g. {shown}:v2), but it starts with `{parts[0]}`."
            )
            return None
        if tag == "latest" and self.validator.applies("no_latest_tag"):
            hint = ""
            if image in ("python", "r"):
                hint = f" `{image}:latest` means `{image}:v1` (which is due to be retired)."
            self.error(
                f"Action `{name}` uses `{parts[0]}`, but `latest` is not supported from "
                f"version 5: give a version instead, e.g. `{image}:v2`.{hint}"
            )
        if image.startswith("cohortextractor") and self.validator.applies("no_cohortextractor"):
            self.error(
                f"Action `{name}` uses cohortextractor, which is not supported from version 4: "
                "use ehrQL instead."
            )
        if (image, tag) in _DEPRECATED_SOON:
            self.validator.warnings.append(
                f"Action `{name}` uses `{parts[0]}`, which is due to be retired: consider a "
                "more recent version."
            )
        return parts

    def _check_needs(self, needs: Any) -> tuple[str, ...]:
        name = self.name
        if needs is None:
            return ()
        if not isinstance(needs, list):
            self.error(
                f"`needs` of action `{name}` must be a list of action names, like `[a, b]`, "
                f"but it is a {_kind(needs)}."
            )
            return ()
        valid: list[str] = []
        for need in needs:
            if not isinstance(need, str):
                item = f"a {_kind(need)}" if isinstance(need, list | dict) else repr(need)
                self.error(
                    f"`needs` of action `{name}` must be a flat list of action names, but one "
                    f"item is {item}."
                )
            elif " " in need or "," in need:
                separate = ", ".join(re.split(r"[ ,]+", need.strip(" ,")))
                self.error(
                    f"`needs` of action `{name}` has `{need}`: list each action separately, "
                    f"separated with commas, like `[{separate}]`."
                )
            elif need == RUN_ALL:
                self.error(
                    f"Action `{name}` needs `{RUN_ALL}`, a reserved name for running every "
                    "action: it cannot be needed."
                )
            elif need not in self.known:
                close = difflib.get_close_matches(need, self.known, n=1)
                hint = f" Did you mean `{close[0]}`?" if close else ""
                self.error(f"Action `{name}` needs `{need}`, which is not an action.{hint}")
            elif need not in valid:
                valid.append(need)
        return tuple(valid)

    def _check_outputs(self, outputs: Any) -> dict[str, dict[str, str]] | None:
        name = self.name
        if not isinstance(outputs, dict):
            self.error(
                f"`outputs` of action `{name}` must be a mapping of privacy levels "
                f"({', '.join(PRIVACY_LEVELS)}) to named output paths."
            )
            return None
        if all(outputs.get(level) is None for level in PRIVACY_LEVELS):
            self.error(
                f"Action `{name}` must have at least one output under one of: "
                f"{', '.join(PRIVACY_LEVELS)}."
            )
        unexpected = [str(key) for key in outputs if key not in PRIVACY_LEVELS]
        if unexpected:
            self.error(
                f"`outputs` of action `{name}` has unknown privacy level(s): "
                f"{', '.join(unexpected)}. Use {', '.join(PRIVACY_LEVELS)}."
            )
        checked: dict[str, dict[str, str]] = {}
        for level in PRIVACY_LEVELS:
            named = outputs.get(level)
            if named is None:
                continue
            if not isinstance(named, dict):
                self.error(
                    f"`{level}` outputs of action `{name}` must be a mapping of output names "
                    f"to paths, but it is a {_kind(named)}."
                )
                continue
            checked[level] = {}
            for output_name, pattern in named.items():
                output_name = str(output_name)
                if output_name in checked[level]:
                    self.error(f"Action `{name}` has the output name `{output_name}` twice.")
                elif not isinstance(pattern, str):
                    self.error(
                        f"Output `{output_name}` of action `{name}` must be a path string, "
                        f"but it is a {_kind(pattern)}."
                    )
                else:
                    problems = _pattern_problems(pattern, level)
                    if problems:
                        self.error(
                            f"Output path {pattern} of action `{name}` is invalid: "
                            f"{'; '.join(problems)}."
                        )
                    checked[level][output_name] = pattern
        return checked

    def _check_config(self, config: Any) -> str | None:
        """The config as JSON, to pass to the action; None when absent or invalid."""
        name = self.name
        if config is None:
            return None
        if not isinstance(config, dict):
            self.error(
                f"`config` of action `{name}` must be a mapping, but it is a {_kind(config)}."
            )
            return None
        if _too_many_values(config):
            self.error(
                f"`config` of action `{name}` is too large: it has more than "
                f"{_MAX_CONFIG_VALUES} values (counting each use of a YAML alias)."
            )
            return None
        try:
            return json.dumps(config)
        except RecursionError:
            self.error(f"`config` of action `{name}` is nested too deeply.")
            return None
        except (TypeError, ValueError) as exc:
            self.error(f"`config` of action `{name}` cannot be passed as JSON: {exc}.")
            return None

    def _check_command_outputs(
        self, run: str, parts: list[str], outputs: dict[str, dict[str, str]]
    ) -> None:
        """Rules that tie an action's outputs to the command it runs."""
        name = self.name
        if _COHORTEXTRACTOR_GENERATE_COHORT.match(run):
            if len(outputs) != 1:
                self.error(
                    f"Action `{name}` runs `generate_cohort`, so it must have outputs at "
                    f"exactly one privacy level, but it has {len(outputs)}."
                )
            directories = sorted({str(PurePosixPath(p).parent) for _, p in _patterns(outputs)})
            if len(directories) != 1 and not any(
                arg == "--output-dir" or arg.startswith("--output-dir=") for arg in parts
            ):
                self.error(
                    f"Action `{name}` runs `generate_cohort`, so its outputs must be in one "
                    f"directory (or it must pass `--output-dir`), but they are in "
                    f"{len(directories)}: {', '.join(d + '/' for d in directories) or 'none'}."
                )
        if ehrql := _EHRQL_GENERATE.match(run):
            command = ehrql.group(2).replace("_", "-")
            checked_levels = [HIGHLY_SENSITIVE]
            if command == "generate-measures":
                checked_levels.append(MODERATELY_SENSITIVE)
            elif outputs.get(MODERATELY_SENSITIVE) or outputs.get(MINIMALLY_SENSITIVE):
                self.error(
                    f"Action `{name}` uses `{command}`, so all its outputs must be "
                    f"`{HIGHLY_SENSITIVE}`."
                )
            spec = _output_argument(parts)
            patterns = [p for level in checked_levels for p in outputs.get(level, {}).values()]
            if not spec:
                self.error(
                    f"Action `{name}` uses `{command}` but has no `--output` argument saying "
                    "where to write its results."
                )
            elif not _patterns_match_output_argument(spec, patterns):
                self.error(
                    f"The outputs of action `{name}` must match its `--output` argument: "
                    f"expected {_expected_pattern(spec)}, got {', '.join(patterns) or 'nothing'}."
                )


def _pattern_problems(pattern: str, level: str) -> list[str]:
    """What is wrong with one output path pattern, if anything."""
    problems = []
    if "\\" in pattern:
        problems.append("it contains back slashes (use forward slashes only)")
    for wildcard in ("**", "?", "["):
        if wildcard in pattern:
            problems.append(f"it contains '{wildcard}' (only the * wildcard is supported)")
    suffix = PurePosixPath(pattern).suffix
    if not suffix or suffix.endswith("*"):
        problems.append("it must end with a file type extension, like .csv")
    elif level == MODERATELY_SENSITIVE and suffix not in MODERATELY_SENSITIVE_FILE_TYPES:
        problems.append(
            f"{suffix} files cannot be {MODERATELY_SENSITIVE} outputs (allowed: "
            f"{', '.join(sorted(MODERATELY_SENSITIVE_FILE_TYPES))})"
        )
    # normpath keeps a leading "..", which would point outside the workspace.
    if posixpath.normpath(pattern) != pattern or ".." in pattern.split("/"):
        problems.append("it is not in standard form (no double slashes, '.' or '..' parts)")
    if pattern == "metadata" or pattern.startswith("metadata/"):
        problems.append("it must not be in the metadata directory")
    if PurePosixPath(pattern).is_absolute() or PureWindowsPath(pattern).is_absolute():
        problems.append("it is an absolute path (use a path relative to the repository)")
    return problems


def _output_argument(parts: list[str]) -> str | None:
    """The value of the `--output` argument of a command, if it has one."""
    for arg, following in zip(parts, [*parts[1:], ""], strict=True):
        if arg == "--output":
            return following
        if arg.startswith("--output="):
            return arg.removeprefix("--output=")
    return None


def _split_output_argument(spec: str) -> tuple[str, str]:
    """ehrQL's `dir/:csv` form names a directory of files of one type; else a single file."""
    path = PurePosixPath(spec)
    stem, colon, extension = path.name.rpartition(":")
    if not colon:
        return spec, ""
    directory = path.parent if not stem else path.with_name(stem)
    return str(directory), f".{extension}"


def _patterns_match_output_argument(spec: str, patterns: list[str]) -> bool:
    directory, extension = _split_output_argument(spec)
    if not extension:
        return spec in patterns
    return all(fnmatch.fnmatchcase(p, f"{directory}/*{extension}") for p in patterns)


def _expected_pattern(spec: str) -> str:
    directory, extension = _split_output_argument(spec)
    return f"{directory}/*{extension}" if extension else spec


def _is_database_action(parts: list[str]) -> bool:
    commands = _DATABASE_COMMANDS.get(parts[0].split(":")[0])
    if commands is None:
        return False
    return commands == "*" or (len(parts) > 1 and parts[1] in commands)


def _is_integer_like(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _too_many_values(value: Any) -> bool:
    stack, seen = [value], 0
    while stack:
        seen += 1
        if seen > _MAX_CONFIG_VALUES:
            return True
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set):
            stack.extend(item)
    return False


def _patterns(outputs: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """(privacy level, pattern) pairs of an action's outputs, in file order."""
    return [(level, p) for level, named in outputs.items() for p in named.values()]


def _action_list(names: list[str]) -> str:
    """The actions sharing an output path: "actions `a`, `b`" or "action `a` 2 times"."""
    if len(set(names)) == 1:
        return f"action `{names[0]}` {len(names)} times"
    return "actions " + ", ".join(f"`{name}`" for name in names)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {dict: "mapping", list: "list", str: "string", bool: "boolean"}
    for python_type, kind in kinds.items():
        if isinstance(value, python_type):
            return kind
    return "number" if isinstance(value, int | float) else type(value).__name__


# --- planning ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionState:
    """What the workspace knows about an action's latest job."""

    state: str | None
    job_id: str | None = None
    outputs_exist: bool = False


@dataclass(frozen=True)
class PlannedJob:
    """A new job to create: what it runs and what it must wait for."""

    action: str
    needs_new: tuple[str, ...]
    needs_existing: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """The outcome of a request: new jobs, and existing jobs it joins."""

    status: str
    message: str
    jobs: tuple[PlannedJob, ...]
    joined: dict[str, str]


_NEVER_RUN = ActionState(None)


def plan(
    pipeline: Pipeline,
    requested_actions: list[str],
    workspace_state: dict[str, ActionState],
    force_run_dependencies: bool = False,
) -> Plan:
    """Decide which jobs a request for `requested_actions` creates in a workspace.

    A requested action always gets a new job unless its latest job is pending or running:
    then the request joins that job. A needed action is reused when its latest job is
    pending or running (the new job waits for it) or succeeded with its outputs still on
    disk; otherwise, or always with `force_run_dependencies`, it gets a new job too.
    `run_all` requests every action, treating each like a needed action.
    """
    if not requested_actions:
        raise UnknownActionError(
            "No actions were requested: choose one or more of "
            f"{', '.join([*pipeline.actions, RUN_ALL])}."
        )
    unknown = [a for a in requested_actions if a != RUN_ALL and a not in pipeline.actions]
    if unknown:
        raise UnknownActionError(_unknown_actions_message(unknown, pipeline.actions))
    run_all = RUN_ALL in requested_actions
    planner = _Planner(pipeline, set(requested_actions), workspace_state, force_run_dependencies)
    for action in pipeline.actions:
        if run_all or action in planner.requested:
            planner.request(action)
    jobs, joined = planner.jobs, planner.joined

    if jobs:
        message = f"Scheduled {len(jobs)} job{'s' if len(jobs) != 1 else ''}: {', '.join(jobs)}"
        if joined:
            message += f"; already scheduled: {', '.join(joined)}"
        return Plan("created", message, tuple(jobs.values()), joined)
    if run_all and not joined:
        message = "All actions have already completed successfully"
    else:
        message = "All requested actions were already scheduled to run"
    return Plan("nothing_to_do", message, (), joined)


@dataclass
class _Planner:
    """Walks the needs of requested actions, deciding for each: new job, wait, or reuse."""

    pipeline: Pipeline
    requested: set[str]
    workspace_state: dict[str, ActionState]
    force_run_dependencies: bool
    jobs: dict[str, PlannedJob] = field(default_factory=dict)
    joined: dict[str, str] = field(default_factory=dict)

    def latest(self, action: str) -> ActionState:
        return self.workspace_state.get(action, _NEVER_RUN)

    def request(self, action: str) -> None:
        state = self.latest(action)
        if state.state in ACTIVE_STATES:
            self.joined[action] = _job_id(action, state)
        elif action not in self.jobs and self.needs_new_job(action):
            self.add_job_with_needs(action)

    def needs_new_job(self, action: str) -> bool:
        state = self.latest(action)
        if state.state in ACTIVE_STATES:
            return False
        if action in self.requested or self.force_run_dependencies:
            return True
        return not (state.state == "succeeded" and state.outputs_exist)

    def add_job_with_needs(self, action: str) -> None:
        """Plan a job for `action`, after jobs for whichever of its needs want one."""
        actions = self.pipeline.actions
        decided: set[str] = set()
        stack: list[tuple[str, Iterator[str]]] = [(action, iter(actions[action].needs))]
        while stack:
            name, needs = stack[-1]
            need = next(needs, None)
            if need is None:
                stack.pop()
                self.jobs[name] = self.planned_job(actions[name])
            elif need not in self.jobs and need not in decided:
                decided.add(need)
                if self.needs_new_job(need):
                    stack.append((need, iter(actions[need].needs)))

    def planned_job(self, action: Action) -> PlannedJob:
        waits = [
            n for n in action.needs if n not in self.jobs and self.latest(n).state in ACTIVE_STATES
        ]
        return PlannedJob(
            action.name,
            needs_new=tuple(n for n in action.needs if n in self.jobs),
            needs_existing=tuple(_job_id(n, self.latest(n)) for n in waits),
        )


def _job_id(action: str, state: ActionState) -> str:
    if state.job_id is None:
        raise ValueError(f"The {state.state} job of action `{action}` has no job id.")
    return state.job_id


def _unknown_actions_message(unknown: list[str], actions: Iterable[str]) -> str:
    names = ", ".join(f"`{a}`" for a in unknown)
    verb = "is not an action" if len(unknown) == 1 else "are not actions"
    return f"{names} {verb} in project.yaml. The actions are: {', '.join([*actions, RUN_ALL])}."
