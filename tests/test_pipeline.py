"""pipeline.py: loading and validating project.yaml, and planning the jobs of a request."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from jobsite.pipeline import (
    RUN_ALL,
    ActionState,
    Pipeline,
    PlannedJob,
    ProjectValidationError,
    UnknownActionError,
    load_pipeline,
    plan,
)


def action(run: str = "python:v2 analysis/a.py", **spec: object) -> dict:
    """An action spec; outputs default to one unique highly_sensitive file."""
    spec.setdefault("outputs", {"highly_sensitive": {"out": f"output/{abs(hash(run))}.csv"}})
    return {"run": run, **spec}


def project(version: object = 5, **actions: dict) -> str:
    """project.yaml text for these actions (`expectations` added for version 3)."""
    data: dict = {"version": version, "actions": actions}
    if version in (3, "3", 3.0, "3.0"):
        data["expectations"] = {"population_size": 1000}
    return yaml.safe_dump(data, sort_keys=False)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ProjectValidationError) as info:
        load_pipeline(text)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def one_error(text: str) -> str:
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


# --- a valid pipeline -------------------------------------------------------------------


def test_loads_actions_in_file_order_with_run_parsed():
    text = project(
        generate=action("ehrql:v1 generate-dataset analysis/dataset.py --output output/d.csv.gz",
                        outputs={"highly_sensitive": {"dataset": "output/d.csv.gz"}}),
        model=action("python:v2 analysis/model.py --flag 'two words'", needs=["generate"],
                     outputs={"moderately_sensitive": {"table": "output/model/*.csv"}}),
    )  # fmt: skip
    pipeline = load_pipeline(text)
    assert list(pipeline.actions) == ["generate", "model"]
    model = pipeline.actions["model"]
    assert model.name == "model"
    assert model.run == "python:v2 analysis/model.py --flag 'two words'"
    assert (model.image, model.tag) == ("python", "v2")
    assert model.args == ("analysis/model.py", "--flag", "two words")
    assert model.needs == ("generate",)
    assert model.outputs == {"moderately_sensitive": {"table": "output/model/*.csv"}}
    assert model.output_patterns() == [("moderately_sensitive", "output/model/*.csv")]
    assert model.config is None
    assert pipeline.version == 5
    assert pipeline.warnings == ()


def test_folded_run_is_whitespace_normalised():
    text = textwrap.dedent("""\
        version: 5
        actions:
          a:
            run: >
              python:v2
                analysis/a.py
              --x 1
            outputs:
              highly_sensitive: {x: output/a.csv}
        """)
    a = load_pipeline(text).actions["a"]
    assert a.run == "python:v2 analysis/a.py --x 1"
    assert a.args == ("analysis/a.py", "--x", "1")


def test_config_is_appended_to_args_as_json():
    config = {"groups": ["a", "b"], "limit": 5, "nested": {"flag": True}}
    a = load_pipeline(project(a=action(config=config))).actions["a"]
    assert a.config == config
    assert a.args == ("analysis/a.py", "--config", json.dumps(config))


def test_empty_config_adds_no_argument():
    a = load_pipeline(project(a=action(config={}))).actions["a"]
    assert a.args == ("analysis/a.py",)


def test_yaml_is_read_with_the_yaml_1_2_core_schema():
    text = textwrap.dedent("""\
        version: 5
        actions:
          a:
            run: python:v2 a.py
            config: {answer: yes, switch: on, octal: 010, date: 2024-01-31, bool: true, none: ~}
            outputs: {highly_sensitive: {x: output/a.csv}}
        """)
    config = load_pipeline(text).actions["a"].config
    assert config == {
        "answer": "yes",
        "switch": "on",
        "octal": 10,
        "date": "2024-01-31",
        "bool": True,
        "none": None,
    }


def test_yaml_anchors_and_merge_keys_work():
    text = textwrap.dedent("""\
        version: 5
        actions:
          a:
            run: python:v2 a.py
            config: &base {x: 1, y: 2}
            outputs: {highly_sensitive: {x: output/a.csv}}
          b:
            run: python:v2 b.py
            config:
              <<: *base
              y: 3
            outputs: {highly_sensitive: {x: output/b.csv}}
        """)
    assert load_pipeline(text).actions["b"].config == {"x": 1, "y": 3}


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ("ehrql:v1 generate-dataset a.py --output output/d.csv", True),
        ("ehrql:v1 generate-measures m.py --output output/m.csv", True),
        ("ehrql:v1 dump-dataset-sql a.py", False),
        ("sqlrunner:latest anything.sql", True),
        ("cohortextractor:latest generate_cohort", True),
        ("cohortextractor:latest generate_codelist_report", True),
        ("cohortextractor:latest generate_measures", False),
        ("databuilder:v0.36.0 generate-dataset a.py --output output/d.csv", True),
        ("python:v2 generate-dataset", False),
    ],
)
def test_database_actions_are_those_of_the_reference(run, expected):
    outputs = {"highly_sensitive": {"x": "output/d.csv"}}
    if "measures" in run:
        outputs = {"highly_sensitive": {"x": "output/m.csv"}}
    text = project(3, a=action(run, outputs=outputs))
    assert load_pipeline(text).actions["a"].is_database_action is expected


def test_version_may_be_written_as_a_string():
    assert load_pipeline(project("4.0", a=action())).version == 4.0


def test_repeated_needs_count_once():
    text = project(a=action("python:v2 a.py"), b=action("python:v2 b.py", needs=["a", "a"]))
    assert load_pipeline(text).actions["b"].needs == ("a",)


# --- warnings ---------------------------------------------------------------------------


def test_old_version_gets_a_warning():
    (warning,) = load_pipeline(project(4, a=action())).warnings
    assert warning.startswith("project.yaml uses version 4; the latest version is 5.")


def test_image_due_for_retirement_gets_a_warning():
    (warning,) = load_pipeline(project(a=action("r:v1 a.R"))).warnings
    assert "Action `a` uses `r:v1`, which is due to be retired" in warning


def test_run_all_action_before_version_5_is_ignored_with_a_warning():
    pipeline = load_pipeline(project(4, run_all=action("python:v2 x.py"), a=action()))
    assert list(pipeline.actions) == ["a"]
    assert any("`run_all` is ignored" in w for w in pipeline.warnings)


def test_ignored_run_all_action_is_still_validated_as_the_reference_does():
    shared = {"highly_sensitive": {"x": "output/a.csv"}}
    text = project(4, run_all=action("python:v2 x.py", outputs=shared), a=action(outputs=shared))
    assert one_error(text).startswith("Output path output/a.csv is not unique")
    assert "must start with an image" in one_error(project(4, run_all=action("x.py")))


# --- YAML errors ------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line():
    text = "version: 5\nactions:\n  a:\n    run: python:v2 a.py\n   outputs: x\n"
    error = one_error(text)
    assert error.startswith("project.yaml is not valid YAML:")
    assert "line 5" in error


def test_duplicate_keys_are_an_error_naming_both_lines():
    text = textwrap.dedent("""\
        version: 5
        actions:
          a:
            run: python:v2 a.py
            outputs:
              highly_sensitive:
                table: output/a.csv
                table: output/b.csv
        """)
    assert one_error(text) == (
        "project.yaml has the key 'table' twice in one mapping, on line 7 and on line 8: "
        "each key may appear only once."
    )


def test_duplicate_action_names_are_an_error():
    text = "version: 5\nactions:\n  a: {run: python:v2 a.py}\n  a: {run: python:v2 b.py}\n"
    assert "key 'a' twice" in one_error(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "but it is empty"),
        ("- a\n- b\n", "but it is a list"),
        ("just text", "but it is a string"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
        ("x: !!python/name:os.system\n", "not valid YAML"),
        ("x: !!int abc\n", "not valid YAML"),
        ("x: !!bool maybe\n", "not valid YAML"),
        ("x: \x00\n", "not valid"),
    ],
)
def test_text_that_is_not_a_project_mapping_is_an_error(text, expected):
    assert expected in one_error(text)


def test_deep_nesting_is_an_error_not_a_crash():
    assert "nesting depth" in one_error("x: " + "[" * 5000 + "]" * 5000)
    config = "{c: " + "[" * 990 + "]" * 990 + "}"
    text = project(a=action()).replace("run:", f"config: {config}\n    run:")
    assert "`config` of action `a` is nested too deeply" in one_error(text)


# --- top level --------------------------------------------------------------------------


def test_unexpected_top_level_key():
    error = errors_of(project(a=action()) + "extra: 1\n")[0]
    assert error.startswith("project.yaml has unexpected top-level key(s): extra.")


def test_missing_version():
    text = yaml.safe_dump({"actions": {"a": action()}})
    assert "must have a `version`" in one_error(text)


@pytest.mark.parametrize("version", ["three", 6, 0, 5.5, True, [5]])
def test_version_must_be_a_number_from_1_to_5(version):
    error = one_error(project(version, a=action()))
    assert error.startswith("`version` must be a number between 1 and 5")


def test_missing_or_wrong_actions_section():
    assert one_error("version: 5\n") == "project.yaml must have an `actions` section."
    assert "must be a mapping of action names" in one_error("version: 5\nactions: [a]\n")


def test_an_empty_actions_mapping_is_valid_as_in_the_reference():
    assert load_pipeline("version: 5\nactions: {}\n").actions == {}


# --- version-dependent rules ------------------------------------------------------------


def test_expectations_required_in_version_3():
    text = yaml.safe_dump({"version": 3, "actions": {"a": action()}})
    assert "version 3 must have an `expectations` section" in one_error(text)


@pytest.mark.parametrize(
    ("expectations", "expected"),
    [
        ({}, "must have `population_size`"),
        ({"population_size": "lots"}, "must be a number"),
        ({"population_size": 10, "x": 1}, "unexpected key(s): x"),
        ([1], "must be a mapping"),
    ],
)
def test_expectations_must_be_valid_in_version_3(expectations, expected):
    text = yaml.safe_dump({"version": 3, "expectations": expectations, "actions": {"a": action()}})
    assert expected in one_error(text)


def test_expectations_are_ignored_before_version_3():
    text = yaml.safe_dump({"version": 2, "expectations": "junk", "actions": {"a": action()}})
    assert load_pipeline(text).version == 2


def test_expectations_not_allowed_from_version_4():
    text = yaml.safe_dump(
        {"version": 4, "expectations": {"population_size": 1}, "actions": {"a": action()}}
    )
    assert "not supported from version 4" in one_error(text)


def test_cohortextractor_allowed_in_version_3_not_4():
    a = action("cohortextractor:latest generate_cohort --study-definition s")
    assert load_pipeline(project(3, a=a))
    error = one_error(project(4, a=a))
    assert error.startswith(
        "Action `a` uses cohortextractor, which is not supported from version 4"
    )


def test_latest_tag_allowed_before_version_5_not_in_5():
    assert load_pipeline(project(4, a=action("stata-mp:latest a.do")))
    error = one_error(project(5, a=action("stata-mp:latest a.do")))
    assert error.startswith("Action `a` uses `stata-mp:latest`, but `latest` is not supported")


def test_latest_tag_of_python_or_r_says_it_means_v1():
    assert "means `python:v1`" in one_error(project(5, a=action("python:latest a.py")))


def test_run_all_is_a_reserved_action_name_from_version_5():
    error = one_error(project(5, run_all=action()))
    assert error.startswith("`run_all` is a reserved action name")


def test_output_paths_must_be_unique_from_version_2():
    shared = {"highly_sensitive": {"x": "output/a.csv"}}
    text = project(
        1, a=action("python:v2 a.py", outputs=shared), b=action("python:v2 b.py", outputs=shared)
    )
    assert load_pipeline(text)
    text = project(
        2, a=action("python:v2 a.py", outputs=shared), b=action("python:v2 b.py", outputs=shared)
    )
    assert one_error(text) == (
        "Output path output/a.csv is not unique: it is an output of actions `a`, `b`. "
        "Each output path may be used only once."
    )


def test_output_path_used_twice_by_one_action():
    outputs = {
        "highly_sensitive": {"x": "output/a.csv"},
        "minimally_sensitive": {"y": "output/a.csv"},
    }
    assert "action `a` 2 times" in one_error(project(a=action(outputs=outputs)))


# --- actions ----------------------------------------------------------------------------


def test_action_must_be_a_mapping():
    assert one_error(project(a="python:v2 a.py")).startswith("Action `a` must be a mapping")


def test_action_must_have_run_and_outputs():
    assert errors_of(project(a={"needs": []})) == [
        "Action `a` has no `run`: every action needs `run` and `outputs`.",
        "Action `a` has no `outputs`: every action needs `run` and `outputs`.",
    ]


def test_unexpected_action_key():
    error = one_error(project(a=action(neds=["b"])))
    assert error.startswith("Action `a` has unexpected key(s): neds.")


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (42, "`run` of action `a` must be a string"),
        ("", "`run` of action `a` is empty"),
        ("   ", "`run` of action `a` is empty"),
        ("python:v2 'unclosed", "`run` of action `a` cannot be split into arguments"),
        ("python a.py", "must start with an image and its version, in the form python:vN"),
        ("python:2 a.py", "in the form python:vN (e.g. python:v2), but it starts with `python:2`"),
        ("python:v2:x a.py", "must start with an image and its version"),
        (":v2 a.py", "must start with an image and its version"),
    ],
)
def test_run_must_be_image_tag_and_args(run, expected):
    assert expected in one_error(project(a=action(run)))


@pytest.mark.parametrize("tag", ["v1", "v2", "v0.36.0", "v2-pre", "dev"])
def test_valid_tags(tag):
    assert load_pipeline(project(a=action(f"python:{tag} a.py"))).actions["a"].tag == tag


def test_actions_with_the_same_run_are_an_error():
    text = project(
        a=action("python:v2 a.py"),
        b=action("python:v2 a.py", outputs={"highly_sensitive": {"y": "b.csv"}}),
    )
    assert one_error(text) == (
        "Action `b` has the same `run` command as action `a`: each action must run something "
        "different."
    )


def test_dummy_data_file_must_be_a_string():
    assert "`dummy_data_file` of action `a`" in one_error(project(a=action(dummy_data_file=3)))


def test_config_must_be_a_mapping():
    assert "`config` of action `a` must be a mapping" in one_error(project(a=action(config=[1])))


def test_config_that_cannot_be_json_is_an_error():
    text = project(a=action()).replace("run:", "config: {b: !!binary aGk=}\n    run:")
    assert "`config` of action `a` cannot be passed as JSON" in one_error(text)


def test_config_exploding_through_aliases_is_an_error_not_a_hang():
    lines = ["version: 5", "bomb:", "  - &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 5)]
    lines += ["actions:", "  a:", "    run: python:v2 a.py", "    config: {big: *l4}"]
    lines += ["    outputs: {highly_sensitive: {x: output/a.csv}}"]
    errors = errors_of("\n".join(lines))
    assert any("`config` of action `a` is too large" in e for e in errors)


# --- needs ------------------------------------------------------------------------------


def test_needs_must_be_a_list():
    text = project(a=action("python:v2 a.py"), b=action("python:v2 b.py", needs="a"))
    assert "`needs` of action `b` must be a list" in one_error(text)


def test_needs_must_name_known_actions_and_suggests_one():
    text = project(generate=action("python:v2 a.py"), b=action("python:v2 b.py", needs=["generat"]))
    assert one_error(text) == (
        "Action `b` needs `generat`, which is not an action. Did you mean `generate`?"
    )


@pytest.mark.parametrize("need", ["a b", "a,b", "a, b"])
def test_needs_must_list_actions_separately(need):
    text = project(
        a=action("python:v2 a.py"),
        b=action("python:v2 b.py"),
        c=action("python:v2 c.py", needs=[need]),
    )
    assert "list each action separately, separated with commas, like `[a, b]`" in one_error(text)


def test_needs_items_must_be_names():
    text = project(a=action("python:v2 a.py"), b=action("python:v2 b.py", needs=[["a"]]))
    assert "must be a flat list of action names, but one item is a list" in one_error(text)


def test_needing_run_all_is_an_error():
    text = project(
        4, run_all=action("python:v2 x.py"), b=action("python:v2 b.py", needs=["run_all"])
    )
    assert "Action `b` needs `run_all`, a reserved name" in one_error(text)


def test_self_dependency_is_an_error():
    text = project(a=action("python:v2 a.py", needs=["a"]))
    assert one_error(text) == "Action `a` needs itself: remove it from its `needs`."


def test_dependency_cycle_is_an_error_showing_the_cycle():
    text = project(
        a=action("python:v2 a.py", needs=["c"]),
        b=action("python:v2 b.py", needs=["a"]),
        c=action("python:v2 c.py", needs=["b"]),
        d=action("python:v2 d.py", needs=["c"]),
    )
    error = one_error(text)
    assert "a -> c -> b -> a" in error


# --- outputs ----------------------------------------------------------------------------


def test_outputs_must_be_a_mapping():
    assert "`outputs` of action `a` must be a mapping" in one_error(
        project(a=action(outputs=["x.csv"]))
    )


def test_outputs_need_at_least_one_privacy_level():
    error = one_error(project(a=action(outputs={"highly_sensitive": None})))
    assert error.startswith("Action `a` must have at least one output under one of:")


def test_unknown_privacy_level():
    outputs = {"highly_sensitive": {"x": "output/a.csv"}, "secret": {"y": "output/b.csv"}}
    assert "unknown privacy level(s): secret" in one_error(project(a=action(outputs=outputs)))


def test_privacy_level_must_map_names_to_strings():
    outputs = {"highly_sensitive": ["output/a.csv"]}
    assert "`highly_sensitive` outputs of action `a` must be a mapping" in one_error(
        project(a=action(outputs=outputs))
    )
    outputs = {"highly_sensitive": {"x": 3}}
    assert "Output `x` of action `a` must be a path string" in one_error(
        project(a=action(outputs=outputs))
    )


@pytest.mark.parametrize(
    ("level", "pattern", "reason"),
    [
        ("highly_sensitive", "output\\a.csv", "back slashes"),
        ("highly_sensitive", "output/**/a.csv", "'**'"),
        ("highly_sensitive", "output/a?.csv", "'?'"),
        ("highly_sensitive", "output/[ab].csv", "'['"),
        ("highly_sensitive", "output/a", "must end with a file type extension"),
        ("highly_sensitive", "output/a.*", "must end with a file type extension"),
        ("moderately_sensitive", "output/a.rds", ".rds files cannot be moderately_sensitive"),
        ("highly_sensitive", "output//a.csv", "not in standard form"),
        ("highly_sensitive", "output/../a.csv", "not in standard form"),
        ("highly_sensitive", "../a.csv", "not in standard form"),
        ("highly_sensitive", "./a.csv", "not in standard form"),
        ("highly_sensitive", "metadata/a.csv", "metadata directory"),
        ("highly_sensitive", "/tmp/a.csv", "absolute path"),
        ("highly_sensitive", "C:/a.csv", "absolute path"),
    ],
)
def test_output_pattern_rules(level, pattern, reason):
    error = one_error(project(a=action(outputs={level: {"x": pattern}})))
    assert error.startswith(f"Output path {pattern} of action `a` is invalid: ")
    assert reason in error


@pytest.mark.parametrize(
    ("level", "pattern"),
    [
        ("moderately_sensitive", "output/tables/*.csv"),
        ("moderately_sensitive", "output/report.html"),
        ("highly_sensitive", "output/data.arrow"),
        ("minimally_sensitive", "output/a.tar.gz"),
    ],
)
def test_valid_output_patterns(level, pattern):
    assert load_pipeline(project(a=action(outputs={level: {"x": pattern}})))


# --- command-specific output rules ------------------------------------------------------


def test_generate_dataset_outputs_must_be_highly_sensitive():
    run = "ehrql:v1 generate-dataset a.py --output output/d.csv"
    outputs = {
        "highly_sensitive": {"d": "output/d.csv"},
        "moderately_sensitive": {"t": "output/t.csv"},
    }
    error = one_error(project(a=action(run, outputs=outputs)))
    assert "uses `generate-dataset`, so all its outputs must be `highly_sensitive`" in error


def test_generate_dataset_needs_an_output_argument():
    run = "ehrql:v1 generate-dataset a.py"
    error = one_error(project(a=action(run, outputs={"highly_sensitive": {"d": "output/d.csv"}})))
    assert "has no `--output` argument" in error


@pytest.mark.parametrize(
    ("output", "pattern", "valid"),
    [
        ("output/d.csv", "output/d.csv", True),
        ("--output=output/d.csv", "output/d.csv", True),
        ("output/d.csv", "output/e.csv", False),
        ("output/tables:csv", "output/tables/*.csv", True),
        ("output/tables:csv", "output/tables/one.csv", True),
        ("output/tables:csv", "output/other/*.csv", False),
        ("output/tables/:arrow", "output/tables/*.arrow", True),
    ],
)
def test_generate_dataset_outputs_must_match_the_output_argument(output, pattern, valid):
    argument = output if output.startswith("--") else f"--output {output}"
    run = f"ehrql:v1 generate-dataset a.py {argument}"
    text = project(a=action(run, outputs={"highly_sensitive": {"d": pattern}}))
    if valid:
        assert load_pipeline(text)
    else:
        assert "must match its `--output` argument" in one_error(text)


def test_generate_measures_outputs_may_be_moderately_sensitive_and_must_match():
    run = "ehrql:v1 generate-measures m.py --output output/measures/:csv"
    good = {"moderately_sensitive": {"m": "output/measures/measure_*.csv"}}
    assert load_pipeline(project(a=action(run, outputs=good)))
    bad = {"moderately_sensitive": {"m": "output/elsewhere/*.csv"}}
    assert one_error(project(a=action(run, outputs=bad))) == (
        "The outputs of action `a` must match its `--output` argument: expected "
        "output/measures/*.csv, got output/elsewhere/*.csv."
    )
    no_output = action("ehrql:v1 generate-measures m.py", outputs=good)
    assert "uses `generate-measures` but has no `--output`" in one_error(project(a=no_output))


def test_generate_cohort_outputs_at_one_level_in_one_directory():
    run = "cohortextractor:latest generate_cohort --study-definition s"
    two_levels = {
        "highly_sensitive": {"a": "output/a.csv"},
        "moderately_sensitive": {"b": "output/b.csv"},
    }
    assert "exactly one privacy level, but it has 2" in one_error(
        project(3, a=action(run, outputs=two_levels))
    )
    two_dirs = {"highly_sensitive": {"a": "output/a.csv", "b": "other/b.csv"}}
    assert "must be in one directory" in one_error(project(3, a=action(run, outputs=two_dirs)))
    with_dir = action(f"{run} --output-dir=output", outputs=two_dirs)
    assert load_pipeline(project(3, a=with_dir))


# --- every problem at once --------------------------------------------------------------


def test_all_problems_of_a_file_are_reported_together():
    text = project(
        a=action("python a.py"),
        b=action(
            "python:v2 b.py", needs=["nope"], outputs={"moderately_sensitive": {"x": "b.rds"}}
        ),
        c=action("python:v2 c.py", extra=1),
    )
    errors = errors_of(text)
    assert errors[0].startswith("`run` of action `a` must start with an image")
    assert errors[1] == "Action `b` needs `nope`, which is not an action."
    assert errors[2].startswith("Output path b.rds of action `b` is invalid")
    assert errors[3].startswith("Action `c` has unexpected key(s): extra.")
    assert len(errors) == 4


# --- plan -------------------------------------------------------------------------------

CHAIN = project(
    extract=action("python:v2 extract.py"),
    clean=action("python:v2 clean.py", needs=["extract"]),
    model=action("python:v2 model.py", needs=["clean"]),
    report=action("python:v2 report.py", needs=["model", "extract"]),
    other=action("python:v2 other.py"),
)


@pytest.fixture
def chain() -> Pipeline:
    return load_pipeline(CHAIN)


def done(job_id: str = "old") -> ActionState:
    return ActionState("succeeded", job_id, outputs_exist=True)


def jobs_of(result) -> list[str]:
    return [job.action for job in result.jobs]


def test_plan_runs_a_requested_action_and_its_missing_dependencies(chain):
    result = plan(chain, ["model"], {})
    assert result.status == "created"
    assert result.jobs == (
        PlannedJob("extract", (), ()),
        PlannedJob("clean", ("extract",), ()),
        PlannedJob("model", ("clean",), ()),
    )
    assert result.message == "Scheduled 3 jobs: extract, clean, model"
    assert result.joined == {}


def test_plan_reuses_succeeded_dependencies_with_outputs(chain):
    state = {"extract": done(), "clean": done()}
    result = plan(chain, ["model"], state)
    assert result.jobs == (PlannedJob("model", (), ()),)
    assert result.message == "Scheduled 1 job: model"


def test_plan_always_reruns_a_requested_action(chain):
    result = plan(chain, ["extract"], {"extract": done()})
    assert jobs_of(result) == ["extract"]


def test_plan_reruns_a_failed_dependency(chain):
    state = {"extract": done(), "clean": ActionState("failed", "j1")}
    assert jobs_of(plan(chain, ["model"], state)) == ["clean", "model"]


def test_plan_reruns_a_dependency_whose_outputs_were_deleted(chain):
    state = {"extract": ActionState("succeeded", "j1", outputs_exist=False), "clean": done()}
    assert jobs_of(plan(chain, ["clean"], state)) == ["extract", "clean"]
    result = plan(chain, ["model"], state)
    assert jobs_of(result) == ["model"]  # clean's outputs are there, so extract is not needed


def test_plan_waits_for_a_running_dependency(chain):
    state = {"extract": done(), "clean": ActionState("running", "j-clean")}
    result = plan(chain, ["report"], state)
    assert result.jobs == (
        PlannedJob("model", (), ("j-clean",)),
        PlannedJob("report", ("model",), ()),
    )


def test_plan_waits_for_a_pending_dependency_without_rerunning_it_when_forced(chain):
    state = {"extract": ActionState("pending", "j-extract")}
    result = plan(chain, ["clean"], state, force_run_dependencies=True)
    assert result.jobs == (PlannedJob("clean", (), ("j-extract",)),)


def test_plan_force_run_dependencies_reruns_succeeded_ones(chain):
    state = {name: done() for name in ("extract", "clean", "model")}
    result = plan(chain, ["model"], state, force_run_dependencies=True)
    assert jobs_of(result) == ["extract", "clean", "model"]


def test_plan_joins_a_requested_action_already_scheduled(chain):
    state = {"extract": done(), "clean": ActionState("running", "j-clean")}
    result = plan(chain, ["clean", "other"], state)
    assert result.joined == {"clean": "j-clean"}
    assert jobs_of(result) == ["other"]
    assert result.message == "Scheduled 1 job: other; already scheduled: clean"


def test_plan_with_every_requested_action_already_scheduled_has_nothing_to_do(chain):
    result = plan(chain, ["clean"], {"clean": ActionState("pending", "j-clean")})
    assert result.status == "nothing_to_do"
    assert result.message == "All requested actions were already scheduled to run"
    assert result.jobs == ()
    assert result.joined == {"clean": "j-clean"}


def test_plan_run_all_runs_whatever_has_not_succeeded(chain):
    result = plan(chain, [RUN_ALL], {"extract": done(), "clean": done()})
    assert jobs_of(result) == ["model", "report", "other"]
    assert result.jobs[1] == PlannedJob("report", ("model",), ())


def test_plan_run_all_after_a_partial_failure_reruns_the_failed_and_the_rest(chain):
    state = {
        "extract": done(),
        "clean": done(),
        "model": ActionState("failed", "j-model"),
        "other": done(),
    }
    result = plan(chain, [RUN_ALL], state)
    assert jobs_of(result) == ["model", "report"]


def test_plan_run_all_with_everything_done_has_nothing_to_do(chain):
    state = {name: done() for name in chain.actions}
    result = plan(chain, [RUN_ALL], state)
    assert (result.status, result.message) == (
        "nothing_to_do",
        "All actions have already completed successfully",
    )


def test_plan_run_all_joins_running_actions(chain):
    state = {name: done() for name in chain.actions} | {"other": ActionState("running", "j-o")}
    result = plan(chain, [RUN_ALL], state)
    assert result.status == "nothing_to_do"
    assert result.message == "All requested actions were already scheduled to run"
    assert result.joined == {"other": "j-o"}


def test_plan_run_all_with_force_reruns_everything_not_running(chain):
    state = {name: done() for name in chain.actions} | {"clean": ActionState("running", "j-c")}
    result = plan(chain, [RUN_ALL], state, force_run_dependencies=True)
    assert jobs_of(result) == ["extract", "model", "report", "other"]
    assert result.joined == {"clean": "j-c"}
    assert result.jobs[1] == PlannedJob("model", (), ("j-c",))


def test_plan_orders_jobs_so_dependencies_come_first(chain):
    result = plan(chain, ["report", "clean", "extract"], {})
    order = jobs_of(result)
    assert order == ["extract", "clean", "model", "report"]
    for job in result.jobs:
        assert all(order.index(need) < order.index(job.action) for need in job.needs_new)


def test_plan_requested_dependency_is_rerun_even_when_succeeded(chain):
    state = {"extract": done(), "clean": done()}
    result = plan(chain, ["model", "extract"], state)
    assert result.jobs == (
        PlannedJob("extract", (), ()),
        PlannedJob("model", (), ()),
    )


def test_plan_unknown_action_names_it_and_lists_the_valid_ones(chain):
    with pytest.raises(UnknownActionError) as info:
        plan(chain, ["modle"], {})
    assert str(info.value) == (
        "`modle` is not an action in project.yaml. The actions are: extract, clean, model, "
        "report, other, run_all."
    )


def test_plan_empty_request_is_an_error(chain):
    with pytest.raises(UnknownActionError, match="No actions were requested"):
        plan(chain, [], {})


def test_plan_ignores_state_of_actions_no_longer_in_the_pipeline(chain):
    result = plan(chain, ["extract"], {"gone": ActionState("running", "j-gone")})
    assert jobs_of(result) == ["extract"]
