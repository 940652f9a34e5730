"""Outputs out of date: their action changed in project.yaml, or an action whose outputs
they read ran again since. The outputs API says why, the workspace page marks the action,
and planning runs an out-of-date dependency again instead of reusing it."""

from __future__ import annotations

import pytest
from helpers import setup_workspace, submit, wait_for_request

from jobsite import pipeline
from jobsite.outputs import Manifest, action_definition

pytestmark = pytest.mark.usefixtures("docker_cleanup")


def definition(run: str, needs=(), args=()) -> dict:
    return action_definition(run, args, needs)


def manifest_of(*actions: tuple[str, str, dict, dict[str, str]]) -> Manifest:
    """A manifest recording (action, job, definition, inputs) in that order."""
    manifest = Manifest()
    for action, job, made, inputs in actions:
        manifest.record_action(action, job, "abc", {}, definition=made, inputs=inputs)
    return manifest


GENERATE = definition("python:v2 gen.py")
ANALYSE = definition("python:v2 analyse.py", needs=["generate"])
REPORT = definition("python:v2 report.py", needs=["analyse"])


def chain() -> Manifest:
    return manifest_of(
        ("generate", "g1", GENERATE, {}),
        ("analyse", "a1", ANALYSE, {"generate": "g1"}),
        ("report", "r1", REPORT, {"analyse": "a1"}),
    )


def test_outputs_made_by_the_current_definitions_are_up_to_date():
    current = {"generate": GENERATE, "analyse": ANALYSE, "report": REPORT}
    assert chain().out_of_date(current) == {"generate": None, "analyse": None, "report": None}


@pytest.mark.parametrize(
    ("changed", "why"),
    [
        (definition("python:v2 gen.py --rows 10"), "the run command of generate has changed"),
        (definition("python:v2 gen.py", args=["--config", '{"n": 2}']), "the config of generate"),
        (definition("python:v2 gen.py", needs=["other"]), "the needs of generate have changed"),
    ],
)
def test_a_changed_action_and_everything_that_read_it_are_out_of_date(changed, why):
    stale = chain().out_of_date({"generate": changed, "analyse": ANALYSE, "report": REPORT})
    assert stale["generate"].startswith(why)
    assert stale["analyse"] == "the outputs of generate, which it read, are out of date"
    assert stale["report"] == "the outputs of analyse, which it read, are out of date"


def test_a_needed_action_that_ran_again_makes_its_readers_out_of_date():
    manifest = chain()
    manifest.record_action("generate", "g2", "abc", {}, definition=GENERATE, inputs={})
    stale = manifest.out_of_date({"generate": GENERATE, "analyse": ANALYSE, "report": REPORT})
    assert stale == {
        "generate": None,
        "analyse": "generate, whose outputs it read, has run again since",
        "report": "the outputs of analyse, which it read, are out of date",
    }


def test_a_removed_action_and_outputs_that_are_gone_are_out_of_date():
    manifest = chain()
    del manifest.data["actions"]["generate"]
    stale = manifest.out_of_date({"analyse": ANALYSE, "report": REPORT})
    assert stale["analyse"] == "the outputs of generate, which it read, are gone"
    stale = chain().out_of_date({"analyse": ANALYSE, "report": REPORT})
    assert stale["generate"] == "generate is no longer an action in project.yaml"


def test_outputs_that_read_each_other_do_not_loop():
    manifest = manifest_of(
        ("a", "a1", definition("python:v2 a.py", needs=["b"]), {"b": "b1"}),
        ("b", "b1", definition("python:v2 b.py", needs=["a"]), {"a": "a1"}),
    )
    current = {"a": definition("python:v2 a.py", needs=["b"]), "b": definition("python:v2 b.py")}
    stale = manifest.out_of_date(current)
    assert stale["b"] == "the needs of b have changed in project.yaml"
    assert stale["a"] == "the outputs of b, which it read, are out of date"


def test_outputs_recorded_before_definitions_were_kept_are_not_called_out_of_date():
    manifest = Manifest()
    manifest.record_action("generate", "g1", "abc", {})
    assert manifest.out_of_date({"generate": GENERATE}) == {"generate": None}


PROJECT = """\
version: "4"
actions:
  generate:
    run: python:v2 -c "mkdir -p output && echo n > output/n.csv"
    outputs:
      moderately_sensitive:
        n: output/n.csv
  analyse:
    run: python:v2 -c "mkdir -p output && cat output/n.csv > output/a.csv"
    needs: [generate]
    outputs:
      moderately_sensitive:
        a: output/a.csv
"""


def test_planning_runs_an_out_of_date_dependency_again_and_says_why():
    project = pipeline.load_pipeline(PROJECT)
    done = pipeline.ActionState("succeeded", "g1", outputs_exist=True)
    stale = pipeline.ActionState("succeeded", "g1", True, "the run command of generate changed")
    assert pipeline.plan(project, ["analyse"], {"generate": done}).message == (
        "Scheduled 1 job: analyse"
    )
    planned = pipeline.plan(project, ["analyse"], {"generate": stale})
    assert [job.action for job in planned.jobs] == ["generate", "analyse"]
    assert planned.message == (
        "Scheduled 2 jobs: generate, analyse; running again because their outputs are out of "
        "date: generate (the run command of generate changed)"
    )
    assert planned.stale == {"generate": "the run command of generate changed"}
    everything = pipeline.plan(
        project,
        ["run_all"],
        {"generate": done, "analyse": pipeline.ActionState("succeeded", "a1", True)},
    )
    assert everything.message == "All actions have already completed successfully"


async def test_a_changed_action_is_out_of_date_in_the_api_and_on_the_page_and_runs_again(
    app, client, make_user, make_repo
):
    headers = await make_user("alice")
    repo = make_repo({"project.yaml": PROJECT})
    await setup_workspace(client, headers, repo)
    done = await wait_for_request(client, headers, await submit(client, headers, ["analyse"]))
    assert done["status"] == "succeeded", done

    outputs = (await client.get("/api/v1/workspaces/ws1/outputs", headers=headers)).json()
    assert outputs["files"]["output/a.csv"]["out_of_date"] is None
    assert outputs["actions"]["analyse"]["inputs"] == {"generate": done["jobs"][0]["id"]}

    repo.commit({"project.yaml": PROJECT.replace("echo n >", "echo m >")}, "generate m")
    outputs = (await client.get("/api/v1/workspaces/ws1/outputs", headers=headers)).json()
    why = "the run command of generate has changed in project.yaml"
    assert outputs["files"]["output/n.csv"]["out_of_date"] == why
    assert outputs["actions"]["analyse"]["out_of_date"] == (
        "the outputs of generate, which it read, are out of date"
    )
    page = (await client.get("/ws1/", headers=headers)).text
    assert f"<strong>Outputs out of date</strong>: {why}" in page
    assert 'data-out-of-date="analyse"' in page

    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": ["analyse"]}, headers=headers
    )
    again = response.json()
    assert [job["action"] for job in again["jobs"]] == ["generate", "analyse"]
    plan_message = await app.state.db.fetchval(  # what the page flashes after Submit
        "SELECT status_message FROM job_requests WHERE id = ?", (again["id"],)
    )
    assert plan_message == (
        "Scheduled 2 jobs: generate, analyse; running again because their outputs are out of "
        f"date: generate ({why})"
    )
    assert (await wait_for_request(client, headers, again["id"]))["status"] == "succeeded"
    outputs = (await client.get("/api/v1/workspaces/ws1/outputs", headers=headers)).json()
    assert {entry["out_of_date"] for entry in outputs["files"].values()} == {None}
    assert "Outputs out of date" not in (await client.get("/ws1/", headers=headers)).text

    done = await wait_for_request(client, headers, await submit(client, headers, ["generate"]))
    assert done["status"] == "succeeded"
    outputs = (await client.get("/api/v1/workspaces/ws1/outputs", headers=headers)).json()
    assert outputs["files"]["output/a.csv"]["out_of_date"] == (
        "generate, whose outputs it read, has run again since"
    )
    assert outputs["files"]["output/n.csv"]["out_of_date"] is None


async def test_with_project_yaml_unreadable_nothing_is_called_out_of_date(
    client, make_user, make_repo
):
    headers = await make_user("alice")
    repo = make_repo({"project.yaml": PROJECT})
    await setup_workspace(client, headers, repo)
    done = await wait_for_request(client, headers, await submit(client, headers, ["generate"]))
    assert done["status"] == "succeeded"
    repo.commit({"project.yaml": "version: '4'\nactions: [oops\n"}, "break it")
    outputs = (await client.get("/api/v1/workspaces/ws1/outputs", headers=headers)).json()
    assert outputs["files"]["output/n.csv"]["out_of_date"] is None
    assert "project.yaml" in outputs["project_yaml_error"]
    page = (await client.get("/ws1/outputs/", headers=headers)).text
    assert "Whether these outputs are out of date is not known" in page
