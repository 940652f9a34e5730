"""project.yaml: load and plan. (Placeholder: the full version lands from the pipeline work.)"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

import yaml

RUN_ALL = "run_all"


class ProjectValidationError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class UnknownActionError(ValueError):
    pass


@dataclass(frozen=True)
class Action:
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
        return [(level, p) for level, pats in self.outputs.items() for p in pats.values()]


@dataclass(frozen=True)
class Pipeline:
    version: float
    actions: dict[str, Action]
    warnings: tuple[str, ...] = ()

    def dependencies(self, action: str) -> list[str]:
        seen: list[str] = []

        def visit(name: str) -> None:
            for need in self.actions[name].needs:
                if need not in seen:
                    visit(need)
                    seen.append(need)

        visit(action)
        return seen


def load_pipeline(text: str) -> Pipeline:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProjectValidationError([f"project.yaml is not valid YAML: {e}"]) from None
    if not isinstance(data, dict) or not isinstance(data.get("actions"), dict):
        raise ProjectValidationError(["project.yaml must have an actions mapping"])
    actions = {}
    for name, spec in data["actions"].items():
        run = " ".join(str(spec["run"]).split())
        image_tag, *rest = shlex.split(run)
        image, _, tag = image_tag.partition(":")
        config = spec.get("config")
        args = tuple(rest) + (("--config", json.dumps(config)) if config else ())
        actions[name] = Action(
            name, run, image, tag, args, tuple(spec.get("needs", [])),
            spec.get("outputs", {}), config, False,
        )  # fmt: skip
    return Pipeline(data.get("version", 1), actions)


@dataclass(frozen=True)
class ActionState:
    state: str | None
    job_id: str | None = None
    outputs_exist: bool = False


@dataclass(frozen=True)
class PlannedJob:
    action: str
    needs_new: tuple[str, ...]
    needs_existing: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    status: str
    message: str
    jobs: tuple[PlannedJob, ...]
    joined: dict[str, str]


def plan(pipeline, requested_actions, workspace_state, force_run_dependencies=False) -> Plan:
    for a in requested_actions:
        if a not in pipeline.actions:
            raise UnknownActionError(f"unknown action {a}")
    jobs = []
    for a in requested_actions:
        jobs.append(PlannedJob(a, (), ()))
    return Plan("created", "Scheduled", tuple(jobs), {})
