"""The OpenAPI document: it names exactly the app's API routes, and the API answers as
it says (schemathesis generates requests from it and checks every answer)."""

from __future__ import annotations

import asyncio
import re

import hypothesis
import schemathesis
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from starlette.routing import Route

from jobsite import auth, openapi
from jobsite.config import load_settings
from jobsite.db import Database
from jobsite.server import create_app

EXAMPLES = 10  # per operation and mode: enough to find a crash, quick enough for every run


def api_routes() -> set[tuple[str, str]]:
    app = create_app(load_settings(environ={}, data_dir="/nonexistent/jobsite-openapi-test"))
    return {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route) and route.path.startswith("/api/")
        for method in route.methods - {"HEAD"}
    }


def test_every_api_route_is_described_and_nothing_else():
    described = {(op.path, op.method) for op in openapi.OPERATIONS}
    routes = api_routes()
    assert routes - described == set(), "routes missing from openapi.OPERATIONS"
    assert described - routes == set(), "operations the app does not have"


def test_the_document_is_openapi_3_1_and_every_schema_it_names_exists():
    document = openapi.build()
    assert document["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(document).validate()  # against OpenAPI 3.1's own schema
    named = set(re.findall(r"#/components/schemas/(\w+)", str(document)))
    assert named <= set(document["components"]["schemas"])
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            params = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert params == set(re.findall(r"{(\w+)}", path)), f"{method} {path}"


async def test_the_document_is_served(client):
    response = await client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    assert response.json() == openapi.build()


def test_the_api_answers_as_documented(tmp_path):
    """Requests made from the document, valid and not, each answered without a server
    error, with a documented status, content type and body."""
    data_dir = tmp_path / "data"

    async def prepare() -> str:
        data_dir.mkdir()
        db = await Database.open(data_dir / "db.sqlite")
        try:
            user_id = await auth.create_user(db, "alice")
            # nothing generated here may start a container
            await db.execute("INSERT INTO site_state (key, value) VALUES ('paused', '1')")
            return await auth.create_token(db, user_id, "schemathesis")
        finally:
            await db.close()

    token = asyncio.run(prepare())
    settings = load_settings(
        environ={},
        data_dir=str(data_dir),
        max_workers=1,
        repos={"allow": [f"{tmp_path}/repos/*"]},  # no generated URL may leave this machine
    )
    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    checks = [
        st_checks.not_a_server_error,
        st_checks.status_code_conformance,
        st_checks.content_type_conformance,
        st_checks.response_schema_conformance,
    ]
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE]
        if len(operation.body) > 0:
            # without a body there is nothing invalid to send: path parameters take any string
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            def answers_as_documented(case) -> None:
                case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=checks)

            answers_as_documented()
        tried.append(operation.label)
    # schemathesis leaves out the document's own operation
    assert sorted(tried) == sorted(
        f"{op.method.upper()} {op.path}"
        for op in openapi.OPERATIONS
        if op.response or op.status == 204
    )
