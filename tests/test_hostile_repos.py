"""Hostile repos and pipelines: what a study repo, its project.yaml or the repo address a
user types can do to the site, tried against real git repos, the real site and Docker.

Each scenario ends with the site intact (``intact.check``): it answers, its database is
sound, and nothing appeared outside its data dir.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import GitRepo, running_site, serve, setup_workspace, submit, user_headers

import jobsite
from jobsite import cli, pipeline
from jobsite.config import SettingsError
from jobsite.datadir import action_log_name
from jobsite.executor import JobError, JobSpec
from jobsite.local_docker import LocalDockerExecutor
from jobsite.repos import (
    RepoNotAllowed,
    Repos,
    RepoUnreachable,
    check_allowed,
    is_allowed,
    repo_address,
)
from jobsite.server import create_app
from jobsite.workspaces import ParsedProjects

GENERATE = {
    "run": "python:v2 -c \"mkdir -p output && echo 'n' > output/counts.csv\"",
    "outputs": {"moderately_sensitive": {"counts": "output/counts.csv"}},
}


def project_yaml(**actions: dict) -> str:
    """project.yaml with these actions (JSON is YAML, and spells any name exactly)."""
    return json.dumps({"version": "5", "actions": {"generate": GENERATE, **actions}})


def evil_action(name: str) -> dict:
    return {
        "run": f"python:v2 -c 'echo {secrets.token_hex(4)}'",
        "outputs": {"moderately_sensitive": {"x": f"output/{secrets.token_hex(4)}.csv"}},
    }


def made_by_test(path: str) -> bool:
    """For ``intact.check``: the repos a test makes beside the data dir, and the data dir
    itself when the site starts after ``intact`` looked."""
    return path == "data" or path.split("/")[0] in ("repos", "elsewhere")


def alias_bomb(levels: int, where: str = "version") -> str:
    """A few hundred bytes of YAML whose ``where`` expands to 9**levels strings."""
    anchors = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"{where}: [{', '.join(anchors)}]\nactions: {{}}\n"


# -- 1. action names become file paths ---------------------------------------------------

BAD_ACTION_NAMES = [
    "../../../../x",
    "../x",
    "a/b",
    "a\\b",
    ".",
    "..",
    "a\0b",
    "a\nb",
    "-rf",
    ".hidden",
    "x" * 201,
    "naïve",
    "a b",
    "a.b/../../c",
]


@pytest.mark.parametrize("name", BAD_ACTION_NAMES)
def test_an_action_name_that_is_not_a_plain_file_name_is_refused_naming_it(name):
    with pytest.raises(pipeline.ProjectValidationError) as info:
        pipeline.load_pipeline(project_yaml(**{name: evil_action(name)}))
    (error,) = info.value.errors
    assert error.startswith("The action name ")
    assert "becomes a file name" in error and "Rename the action" in error
    assert name[:40] in error or repr(name[:40])[1:-1] in error
    assert "\n" not in error and len(error) < 600


@pytest.mark.parametrize("name", ["generate_2", "A-b_C", "_x", "1", "x" * 200, "run_all"])
def test_ordinary_action_names_are_file_names(name):
    assert action_log_name(name) == f"metadata/{name}.log"


@pytest.mark.parametrize("name", BAD_ACTION_NAMES)
def test_a_log_is_never_named_by_an_unsafe_action_name(name):
    with pytest.raises(ValueError, match="cannot name a log"):
        action_log_name(name)


@pytest.mark.docker
async def test_the_site_refuses_to_run_an_action_named_as_a_path(
    client, make_user, make_repo, intact, docker_cleanup
):
    headers = await make_user("alice")
    name = "../../../../x"
    repo = make_repo({"project.yaml": project_yaml(**{name: evil_action(name)})})
    await setup_workspace(client, headers, repo)
    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": [name]}, headers=headers
    )
    assert response.status_code == 400
    assert "The action name `../../../../x` cannot be used" in response.json()["error"]
    shown = (await client.get("/api/v1/workspaces/ws1", headers=headers)).json()
    assert "The action name `../../../../x` cannot be used" in shown["project_yaml_error"]
    assert shown["actions"] == []
    await intact.check(client, allowed=made_by_test)


@pytest.mark.parametrize("name", ["../../x", "..", "a/b"])
def test_jobsite_run_and_check_refuse_an_action_named_as_a_path(tmp_path, capsys, name):
    checkout = tmp_path / "study"
    checkout.mkdir()
    (checkout / "project.yaml").write_text(project_yaml(**{name: evil_action(name)}))
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(["run", name, "--project-dir", str(checkout)]) == 1
    assert "cannot be used: an action's name becomes a file name" in capsys.readouterr().out
    assert cli.main(["check", "--project-dir", str(checkout)]) == 1
    assert "cannot be used: an action's name becomes a file name" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


# -- 4. repos.allow cannot be walked out of ---------------------------------------------


@pytest.fixture
def elsewhere(tmp_path, repos_dir) -> GitRepo:
    """A real repo outside the allowed folder, and a link to it inside that folder."""
    path = tmp_path / "elsewhere" / "study"
    path.mkdir(parents=True)
    repo = GitRepo(path)
    repo.git("init", "--quiet", "-b", "main")
    repo.commit({"project.yaml": project_yaml()})
    (repos_dir / "link").symlink_to(path)
    return repo


def outside_allowed(repos_dir: Path) -> list[str]:
    base = str(repos_dir)
    return [
        f"{base}/../elsewhere/study",
        f"{base}/./../elsewhere/study",
        f"{base}/study/../../elsewhere/study",
        f"{base}//../elsewhere/study",
        f"{base}/%2e%2e/elsewhere/study",
        f"{base}/%2E%2E/elsewhere/study",
        f"{base}/..%2felsewhere/study",
        f"{base}/..\\elsewhere\\study",
        f"{base}/../elsewhere/study/",
        f"{base}/../elsewhere/study?x",
        f"{base}/../elsewhere/study#x",
        f"{base}/link",
        f"{base}/link/",
    ]


async def test_a_local_repo_outside_the_allowed_folder_is_refused_however_it_is_spelled(
    elsewhere, client, make_user, make_repo, repos_dir, settings, intact
):
    headers = await make_user("alice")
    make_repo({"project.yaml": project_yaml()})
    project = await client.post("/api/v1/projects", json={"name": "Study"}, headers=headers)
    slug = project.json()["slug"]
    for n, repo in enumerate(outside_allowed(repos_dir)):
        response = await client.post(
            f"/api/v1/projects/{slug}/workspaces",
            json={"name": f"ws{n}", "repo": repo, "branch": "main", "database": "sample"},
            headers=headers,
        )
        assert response.status_code == 400, repo
        error = response.text
        assert "is not a repo this site can use" in error or "is not allowed" in error, repo
    assert not list(settings.data.repos.glob("*.git")), "nothing was cloned"
    fine = await client.post(
        f"/api/v1/projects/{slug}/workspaces",
        json={"name": "ok", "repo": f"{repos_dir}/study/", "branch": "main", "database": "sample"},
        headers=headers,
    )
    assert fine.status_code == 201, fine.text
    assert fine.json()["repo"] == f"{repos_dir}/study"
    await intact.check(client, allowed=made_by_test)


LOOPBACK_ORG = "http://127.0.0.1:9/our-org"  # nothing listens: a clone would fail at once


@pytest.mark.parametrize(
    "repo",
    [
        f"{LOOPBACK_ORG}/../other/repo",
        f"{LOOPBACK_ORG}/./../other/repo",
        f"{LOOPBACK_ORG}/x/../../other/repo",
        f"{LOOPBACK_ORG}/%2e%2e/other/repo",
        f"{LOOPBACK_ORG}/%2E./other/repo",
        f"{LOOPBACK_ORG}/x?/../../other/repo",
        f"{LOOPBACK_ORG}/x#/../../other/repo",
        f"{LOOPBACK_ORG}/..\\other\\repo",
        "http://our-org@127.0.0.1:9/our-org/x",
        f"{LOOPBACK_ORG}/x@127.0.0.2/repo",
        f"{LOOPBACK_ORG}/re po",
        f"{LOOPBACK_ORG}/repo\0",
        f"{LOOPBACK_ORG}//repo",
    ],
)
async def test_a_url_outside_the_allowed_prefix_is_refused_before_any_clone(
    repo, client, make_user, settings, intact
):
    settings.repos.allow = [f"{LOOPBACK_ORG}/*"]
    headers = await make_user("alice")
    project = await client.post("/api/v1/projects", json={"name": "Study"}, headers=headers)
    response = await client.post(
        f"/api/v1/projects/{project.json()['slug']}/workspaces",
        json={"name": "ws1", "repo": repo, "branch": "main", "database": "sample"},
        headers=headers,
    )
    assert response.status_code == 400
    assert "is not a repo this site can use" in response.text
    assert "could not clone" not in response.text
    assert not settings.data.repos.exists() or not list(settings.data.repos.iterdir())
    await intact.check(client, allowed=made_by_test)


def test_repo_addresses_are_compared_in_one_normal_form(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert repo_address("HTTPS://GitHub.com/Org/Study.git/") == "https://github.com/Org/Study.git"
    assert repo_address(f"{tmp_path}/alias/study") == f"{tmp_path}/real/study"
    assert check_allowed(f"{tmp_path}/alias/study", [f"{tmp_path}/real/*"])
    assert check_allowed(f"{tmp_path}/real/study", [f"{tmp_path}/alias/*"])
    with pytest.raises(RepoNotAllowed, match="not allowed on this site"):
        check_allowed(f"{tmp_path}/alias/study", [f"{tmp_path}/alias-2/*"])
    assert is_allowed("https://github.com/our-org/study", ["https://github.com/our-org/*"])
    assert not is_allowed("https://github.com/our-org/../x", ["https://github.com/our-org/*"])
    for repo in ["", "study", "git@github.com:org/study", "file:///srv/x", "/", "x" * 2000]:
        with pytest.raises(RepoNotAllowed, match="is not a repo this site can use"):
            repo_address(repo)


# -- 5. a YAML alias bomb, and other large files -----------------------------------------


@pytest.mark.parametrize("where", ["version", "expectations", "bomb"])
def test_an_alias_bomb_is_described_without_being_expanded(where):
    started = time.monotonic()
    with pytest.raises(pipeline.ProjectValidationError) as info:
        pipeline.load_pipeline(alias_bomb(9, where))
    assert time.monotonic() - started < 5, "a bounded walk"
    (error,) = info.value.errors
    assert "too large once its YAML aliases are expanded" in error and len(error) < 400


@pytest.mark.parametrize(
    "spec",
    [
        {"version": "*big"},
        {"needs": "*big"},
        {"run": "*big"},
        {"run": "*text"},
        {"run": "python:v2 --output *text"},
        {"needs": "[*text, *text, *text]"},
        {"outputs": "{highly_sensitive: {x: *text}}"},
        {"outputs": "{moderately_sensitive: {*text: *text}}"},
        {"outputs": "{highly_sensitive: {x: *big}}"},
        {"outputs": "{*big: {x: output/a.csv}}"},
        {"config": "*big"},
    ],
)
def test_a_value_below_the_limit_is_quoted_cut_short(spec):
    """A few hundred KB of values (aliases expanded), inside the limit: each message quotes
    at most a little of any one, and the file's report stays small."""
    text = "\n".join(
        [
            "version: 5",
            f"bigtext: &text {'x' * 50_000} y,z",
            "biglist: &big [" + ", ".join(["*text"] * 3) + "]",
            "actions:",
            "  a:",
            f"    run: {spec.get('run', 'python:v2 a.py')}",
            f"    needs: {spec.get('needs', '[]')}",
            f"    outputs: {spec.get('outputs', '{highly_sensitive: {x: output/a.csv}}')}",
            f"    config: {spec.get('config', '{}')}",
        ]
    )
    if "version" in spec:
        text = text.replace("version: 5", "version: [*big, *big]")
    with pytest.raises(pipeline.ProjectValidationError) as info:
        pipeline.load_pipeline(text)
    assert len(str(info.value)) < 2_000, str(info.value)[:500]


def test_a_long_scalar_in_a_yaml_error_is_quoted_cut_short():
    for text in [f"version: !!int {'9' * 100_000}x", f"x: !!bool {'t' * 100_000}"]:
        with pytest.raises(pipeline.ProjectValidationError) as info:
            pipeline.load_pipeline(text)
        assert len(str(info.value)) < 600


def test_a_file_with_thousands_of_problems_reports_the_first_hundred():
    actions = {f"a{n}": {"run": "python a.py"} for n in range(500)}
    with pytest.raises(pipeline.ProjectValidationError) as info:
        pipeline.load_pipeline(json.dumps({"version": 5, "actions": actions}))
    assert len(info.value.errors) == 101
    assert info.value.errors[-1].startswith("... and ")


def test_needs_repeated_through_aliases_are_checked_in_linear_time():
    names = [f"a{n}" for n in range(2000)]
    lines = ["version: 5", f"all: &all [{', '.join(names)}]", "actions:"]
    for n, name in enumerate(names):
        needs = "*all" if n else "[]"
        lines += [f"  {name}: {{run: python:v2 {name}.py, needs: {needs},"]
        lines += [f"    outputs: {{highly_sensitive: {{x: output/{name}.csv}}}}}}"]
    started = time.monotonic()
    with pytest.raises(pipeline.ProjectValidationError):  # every action needs itself
        pipeline.load_pipeline("\n".join(lines))
    assert time.monotonic() - started < 30


def test_a_project_yaml_over_the_size_limit_is_refused():
    with pytest.raises(pipeline.ProjectValidationError, match=r"is 1\.5 MiB, more than the 1\.0"):
        pipeline.load_pipeline(project_yaml() + "\n#" + "x" * (3 * 2**19))


async def test_a_project_yaml_over_1_mib_in_git_is_refused_with_what_to_do(
    client, make_user, make_repo, intact
):
    headers = await make_user("alice")
    padding = "\n# " + "x" * (3 * 2**19)
    repo = make_repo({"project.yaml": project_yaml() + padding})
    await setup_workspace(client, headers, repo)
    shown = (await client.get("/api/v1/workspaces/ws1", headers=headers)).json()
    assert "project.yaml is 1.5 MiB, more than the 1.0 MiB" in shown["project_yaml_error"]
    assert "make it smaller" in shown["project_yaml_error"]
    response = await client.post(
        "/api/v1/workspaces/ws1/job-requests", json={"actions": ["generate"]}, headers=headers
    )
    assert response.status_code == 400
    assert "more than the 1.0 MiB a project.yaml may be" in response.json()["error"]
    await intact.check(client, allowed=made_by_test)


def test_the_site_keeps_answering_while_an_alias_bomb_is_viewed(settings, make_repo, intact):
    """A real server on loopback: while a bomb repo's workspace page is viewed over and
    over, other requests are answered promptly, and the server stops promptly after."""
    repo = make_repo({"project.yaml": project_yaml()})
    app = create_app(settings)
    with serve(app) as (url, loop):
        headers = asyncio.run_coroutine_threadsafe(user_headers(app, "alice"), loop).result()
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            created = http.post("/api/v1/projects", json={"name": "Study"})
            http.post(
                f"/api/v1/projects/{created.json()['slug']}/workspaces",
                json={"name": "ws1", "repo": repo.url, "branch": "main", "database": "sample"},
            ).raise_for_status()
            repo.commit({"project.yaml": alias_bomb(7)}, "a bomb")

            def view(_: int) -> httpx.Response:
                with httpx.Client(base_url=url, timeout=60) as anonymous:
                    return anonymous.get("/ws1/")

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                views = [pool.submit(view, n) for n in range(16)]
                # all the while, the server's loop answers within the client's time limit
                health: list[int | str] = []
                while not all(v.done() for v in views) or not health:
                    try:
                        health.append(httpx.get(f"{url}/api/v1/health", timeout=0.5).status_code)
                    except httpx.TimeoutException:
                        health.append("no answer within 0.5 s")
                pages = [v.result() for v in views]
        assert set(health) == {200}
        # past the site's share for one page, views are shed at once (503), never left hanging
        served = [page for page in pages if page.status_code != 503]
        assert served, "no view of the bomb's page was served"
        assert all("Retry-After" in page.headers for page in pages if page.status_code == 503)
        for page in served:
            assert page.status_code == 200
            assert "too large once its YAML aliases are expanded" in page.text
            assert len(page.text) < 200_000
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 15, "the server stopped promptly"
    assert intact.new_files(allowed=made_by_test) == set()


def chain_of(count: int, needs_all: bool = False) -> str:
    """A valid pipeline of ``count`` actions, each needing the one before it (or every one
    before it), listed last first."""
    actions = {}
    for n in reversed(range(count)):
        needs = [f"a{m}" for m in range(n)] if needs_all else [f"a{n - 1}"] if n else []
        actions[f"a{n}"] = {
            "run": f"python:v2 a{n}.py",
            "needs": needs,
            "outputs": {"highly_sensitive": {"x": f"output/a{n}.csv"}},
        }
    return json.dumps({"version": 5, "actions": actions})


@pytest.mark.parametrize(
    ("pipeline_text", "drawn"),
    [(chain_of(1500), True), (chain_of(150, needs_all=True), False)],
    ids=["a chain 1500 long", "150 actions each needing all before it"],
)
async def test_a_long_or_dense_pipeline_is_shown_without_stalling_the_site(
    pipeline_text, drawn, client, make_user, make_repo, intact
):
    headers = await make_user("alice")
    repo = make_repo({"project.yaml": pipeline_text})
    await setup_workspace(client, headers, repo)
    page = await client.get("/ws1/")
    assert page.status_code == 200
    assert ("too large to draw" not in page.text) == drawn
    assert ('<svg class="graph"' in page.text) == drawn
    assert '<tr data-action="a149">' in page.text, "every action is listed"
    await intact.check(client, allowed=made_by_test)


class CountingRepos(Repos):
    """Real mirrors, counting the reads of project.yaml and the updates from the remote."""

    def __init__(self, root: Path, fetch_interval: float = 60) -> None:
        super().__init__(root, timeout=30, fetch_interval=fetch_interval)
        self.reads = 0
        self.updates = 0

    async def read_file(self, *args, **kwargs) -> str:
        self.reads += 1
        return await super().read_file(*args, **kwargs)

    async def _update(self, url: str) -> Path:
        self.updates += 1
        return await super()._update(url)


async def test_a_broken_project_yaml_is_parsed_once_per_commit(make_repo, tmp_path):
    repo = make_repo({"project.yaml": alias_bomb(8)})
    repos = CountingRepos(tmp_path / "mirrors")
    sha = await repos.resolve_branch(repo.url, "main")
    projects = ParsedProjects()
    results = await asyncio.gather(
        *[projects.at(repos, repo.url, sha) for _ in range(10)], return_exceptions=True
    )
    again = await asyncio.gather(projects.at(repos, repo.url, sha), return_exceptions=True)
    for result in results + again:
        assert isinstance(result, pipeline.ProjectValidationError)
        assert "aliases are expanded" in str(result)
    assert repos.reads == 1, "ten callers at once shared one parse, and the error was kept"


async def test_only_the_most_recently_used_commits_stay_parsed(make_repo, tmp_path):
    repo = make_repo({"project.yaml": project_yaml()})
    repos = CountingRepos(tmp_path / "mirrors")
    first = await repos.resolve_branch(repo.url, "main")
    second = repo.commit({"project.yaml": project_yaml(second=evil_action("second"))})
    await repos.fetch(repo.url, fresh=True)
    projects = ParsedProjects(size=1)
    assert list((await projects.at(repos, repo.url, first)).actions) == ["generate"]
    assert list((await projects.at(repos, repo.url, second)).actions) == ["generate", "second"]
    await projects.at(repos, repo.url, first)
    assert repos.reads == 3, "the first commit was parsed again"


async def test_a_repo_is_fetched_once_however_many_ask_at_once(make_repo, tmp_path):
    repo = make_repo({"project.yaml": project_yaml()})
    repos = CountingRepos(tmp_path / "mirrors")
    await asyncio.gather(*[repos.resolve_branch(repo.url, "main") for _ in range(20)])
    assert repos.updates == 1
    second = repo.commit({"project.yaml": project_yaml(second=evil_action("second"))})
    assert await repos.resolve_branch(repo.url, "main") != second, "within the interval"
    assert await repos.resolve_branch(repo.url, "main", fresh=True) == second
    assert repos.updates == 2
    missing = str(tmp_path / "repos" / "missing")
    for _ in range(3):
        with pytest.raises(RepoUnreachable, match="could not clone"):
            await repos.fetch(missing)
    assert repos.updates == 3, "a failure stands for the interval too"


def last_fetch(mirror: Path) -> int | None:
    """When git last fetched into a mirror (None: only cloned)."""
    fetch_head = mirror / "FETCH_HEAD"
    return fetch_head.stat().st_mtime_ns if fetch_head.exists() else None


async def view(client: httpx.AsyncClient, path: str) -> httpx.Response:
    """A page, asked for again while the site refuses it as busy (its loop may run behind
    while thirty views arrive at once: then it takes a few of a page at a time)."""
    for _ in range(200):
        page = await client.get(path)
        if page.status_code != 503:
            return page
        await asyncio.sleep(0.05)
    return page


async def test_viewing_a_workspace_over_and_over_fetches_its_repo_at_most_once_per_interval(
    settings, make_repo, intact
):
    settings.repos.fetch_interval = 60
    settings.max_requests = settings.max_requests_per_page = 64  # all 30 views at once
    repo = make_repo({"project.yaml": project_yaml()})
    async with running_site(settings) as (app, client):
        headers = await user_headers(app, "alice")
        await setup_workspace(client, headers, repo)
        fetched = last_fetch(app.state.repos.mirror_path(repo.url))
        repo.commit({"project.yaml": project_yaml(second=evil_action("second"))})
        shown = await asyncio.gather(
            *[view(client, "/api/v1/workspaces/ws1") for _ in range(20)],
            *[view(client, "/ws1/") for _ in range(10)],
        )
        assert all(page.status_code == 200 for page in shown)
        assert all("second" not in page.text for page in shown), "the mirror was not fetched"
        assert last_fetch(app.state.repos.mirror_path(repo.url)) == fetched
        # acting on the workspace fetches anew: what was just pushed runs
        request_id = await submit(client, headers, ["second"])
        assert request_id
        await intact.check(client, allowed=made_by_test)


# -- 9. database networks must be internal ------------------------------------------------


@pytest.fixture
def networks(docker_client, settings):
    """An internal and an ordinary bridge network, made for this test and removed after."""
    made = {
        kind: docker_client.networks.create(
            f"jobsite-test-{kind}-{secrets.token_hex(4)}",
            internal=kind == "internal",
            labels={"jobsite.test": settings.site_id},
        )
        for kind in ("internal", "bridge")
    }
    yield {kind: network.name for kind, network in made.items()}
    for network in made.values():
        network.remove()


@pytest.mark.docker
async def test_a_database_network_that_can_reach_the_internet_stops_the_site_at_start(
    networks, settings, intact
):
    for network, problem in [
        (networks["bridge"], "is not internal: it can reach the internet"),
        (f"jobsite-test-missing-{secrets.token_hex(4)}", "there is no Docker network"),
    ]:
        settings.databases["full"].network = network
        with pytest.raises(SettingsError, match=r"databases\.full\.network: ") as info:
            async with running_site(settings):
                pytest.fail("the site started")
        assert problem in str(info.value) and "docker network create --internal" in str(info.value)
    settings.databases["full"].network = networks["internal"]
    async with running_site(settings) as (_app, client):
        await intact.check(client, allowed=made_by_test)


async def test_with_docker_down_the_site_starts_and_checks_each_database_job(
    settings, monkeypatch, caplog
):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")  # nothing listens there
    settings.databases["full"].network = "db-net"
    await LocalDockerExecutor(settings).check_settings()
    assert "could not check the databases' networks yet" in caplog.text


@pytest.mark.docker
def test_jobsite_serve_names_the_database_network_setting(networks, tmp_path, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("it served"))
    config = tmp_path / "jobsite.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "databases": {"full": {"description": "all", "network": networks["bridge"]}},
            }
        )
    )
    assert cli.main(["--config", str(config), "serve"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("jobsite: databases.full.network: the Docker network")
    assert not (tmp_path / "data" / "db.sqlite").exists(), "refused before anything started"


@pytest.mark.docker
async def test_a_database_job_on_a_network_that_is_not_internal_is_not_started(
    networks, settings, docker_client, docker_cleanup
):
    executor = LocalDockerExecutor(settings)
    job = JobSpec(
        id=secrets.token_hex(8),
        job_request_id=1,
        workspace="ws1",
        repo="",
        sha="",
        action="extract",
        run_command="ehrql:v1 generate-dataset",
        image="ghcr.io/opensafely-core/ehrql:v1",
        args=["-c", "true"],
        outputs={},
        needs=[],
        requires_db=True,
        database_url="mssql://db",
        database_network=networks["bridge"],
    )
    settings.data.job_dir(job.id).mkdir(parents=True)
    try:
        with pytest.raises(JobError, match="network is not safe to use: the Docker network"):
            await executor.create(job)
    finally:
        executor.close()
    assert not docker_client.containers.list(all=True, filters={"name": f"jobsite-{job.id}"})


# -- supported Python versions ------------------------------------------------------------


def test_the_supported_pythons_are_stated_once_and_checked():
    pyproject = tomllib.loads((Path(jobsite.__file__).parent / "pyproject.toml").read_text())
    oldest = ".".join(map(str, jobsite.OLDEST_PYTHON))
    assert pyproject["project"]["requires-python"] == f">={oldest}"
    jobsite.check_python((3, 11, 2, "final", 0))
    jobsite.check_python((3, 14, 0))
    with pytest.raises(
        SystemExit, match=r"needs Python 3\.11 or later, but this is Python 3\.10\.12"
    ):
        jobsite.check_python((3, 10, 12, "final", 0))
