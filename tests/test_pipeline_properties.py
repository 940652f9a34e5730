"""Whatever the input, load_pipeline answers with a Pipeline or a ProjectValidationError."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobsite.pipeline import ActionState, ProjectValidationError, load_pipeline, plan

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = st.sampled_from(
    ["version", "actions", "expectations", "run", "needs", "outputs", "config",
     "highly_sensitive", "moderately_sensitive", "minimally_sensitive", "population_size",
     "run_all", "a", "b", "dummy_data_file"]
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-10, 10)
    | st.floats(allow_nan=True)
    | st.sampled_from(
        ["python:v2 a.py", "ehrql:v1 generate-dataset a.py --output o/d.csv", "o/d.csv",
         "r:latest x.R", "cohortextractor:latest generate_cohort", "a", "b", "3", "5.0",
         "output/*.csv", "../x.csv", "metadata/x.log", "", " ", "'", "a b", "a,b"]
    )
    | st.text(max_size=12)
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=30,
)


def load_or_reject(text: str) -> None:
    try:
        pipeline = load_pipeline(text)
    except ProjectValidationError as exc:
        assert exc.errors
        assert all(isinstance(error, str) and error for error in exc.errors)
    else:
        for name in pipeline.actions:
            pipeline.dependencies(name)
        if pipeline.actions:
            plan(pipeline, ["run_all"], {name: ActionState(None) for name in pipeline.actions})


@FAST
@given(st.text(max_size=300))
def test_any_text_is_loaded_or_rejected(text):
    load_or_reject(text)


@FAST
@given(st.text(alphabet="version:5actions\n -[]{},&*!|>'\"#<>?~.0123456789abc\t", max_size=200))
def test_yaml_like_text_is_loaded_or_rejected(text):
    load_or_reject(text)


@FAST
@given(VALUES)
def test_any_yaml_document_is_loaded_or_rejected(data):
    load_or_reject(yaml.safe_dump(data))


@FAST
@given(
    st.sampled_from([1, 2, 3, 4, 5, "3.0"]),
    st.dictionaries(
        st.sampled_from(["a", "b", "c", "run_all"]),
        st.fixed_dictionaries(
            {"run": SCALARS},
            optional={"needs": VALUES, "outputs": VALUES, "config": VALUES, "x": SCALARS},
        ),
        max_size=4,
    ),
    st.one_of(st.none(), VALUES),
)
def test_any_project_shaped_mapping_is_loaded_or_rejected(version, actions, expectations):
    data = {"version": version, "actions": actions}
    if expectations is not None:
        data["expectations"] = expectations
    load_or_reject(yaml.safe_dump(data))


@st.composite
def pipelines_and_states(draw):
    """A valid pipeline of up to 8 actions (each needing earlier ones) and workspace state."""
    count = draw(st.integers(1, 8))
    names = [f"a{i}" for i in range(count)]
    actions = {
        name: {
            "run": f"python:v2 {name}.py",
            "needs": draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else [],
            "outputs": {"highly_sensitive": {"x": f"output/{name}.csv"}},
        }
        for i, name in enumerate(names)
    }
    pipeline = load_pipeline(yaml.safe_dump({"version": 5, "actions": actions}))
    states = st.sampled_from(["pending", "running", "succeeded", "failed", None])
    state = {
        name: ActionState(draw(states), f"job-{name}", draw(st.booleans()))
        for name in draw(st.lists(st.sampled_from(names), unique=True))
    }
    requested = draw(st.lists(st.sampled_from([*names, "run_all"]), min_size=1, unique=True))
    return pipeline, state, requested, draw(st.booleans())


@FAST
@given(pipelines_and_states())
def test_plan_keeps_its_promises(case):
    pipeline, state, requested, force = case
    result = plan(pipeline, requested, state, force)
    latest = {name: state.get(name, ActionState(None)) for name in pipeline.actions}
    active = {name for name, s in latest.items() if s.state in ("pending", "running")}
    planned = [job.action for job in result.jobs]
    wanted = set(pipeline.actions) if "run_all" in requested else set(requested)

    assert len(planned) == len(set(planned))
    assert not active & set(planned), "an action already pending or running gets no new job"
    assert set(result.joined) == wanted & active
    assert (result.status == "created") == bool(planned)
    for name in set(requested) - {"run_all"} - active:
        assert name in planned, "a requested action always gets a new job"
    for position, job in enumerate(result.jobs):
        needs = pipeline.actions[job.action].needs
        assert all(planned.index(n) < position for n in job.needs_new)
        assert set(job.needs_new) == set(needs) & set(planned)
        assert set(job.needs_existing) == {f"job-{n}" for n in needs if n in active}
        for need in set(needs) - set(planned) - active:
            assert latest[need].state == "succeeded" and latest[need].outputs_exist
            assert not force
