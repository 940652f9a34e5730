"""The OpenAPI 3.1 description of the JSON API, served at ``/api/v1/openapi.json``.

Each operation is declared once in ``OPERATIONS``; the document is built from that list.
tests/test_openapi.py checks that the list and the app's /api/v1 routes name the same
operations, so neither can change without the other.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

from .states import State

TITLE = "jobsite API"
VERSION = "1"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
    }


STRING = {"type": "string"}
TIME = {"type": "string", "format": "date-time"}
MAYBE_TIME = {"type": ["string", "null"], "format": "date-time"}
MAYBE_STRING = {"type": ["string", "null"]}
NAMES = {"type": "array", "items": STRING}
ROLE = {"type": "string", "enum": ["developer", "collaborator", "output_viewer"]}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": obj({"error": {"type": "string", "description": "what went wrong and what to do"}}),
    "Health": obj({"status": {"const": "ok"}}),
    "NewProject": obj({"name": {"type": "string", "minLength": 1}}),
    "Project": obj({"slug": STRING, "name": STRING}),
    "Member": obj({"username": STRING, "roles": {"type": "array", "items": ROLE}}),
    "NewMember": obj(
        {"username": STRING, "roles": {"type": "array", "items": ROLE, "minItems": 1}}
    ),
    "Members": obj({"members": {"type": "array", "items": ref("Member")}}),
    "NewWorkspace": obj(
        {
            "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$"},
            "repo": {"type": "string", "description": "a git URL the site allows"},
            "branch": STRING,
            "database": {"type": "string", "description": "one of the site's databases"},
        },
        {"purpose": STRING, "notify_default": {"type": "boolean"}},
    ),
    "Workspace": obj(
        {
            "name": STRING,
            "project": STRING,
            "repo": STRING,
            "branch": STRING,
            "database": STRING,
            "purpose": STRING,
            "archived": {"type": "boolean"},
            "created_at": TIME,
        }
    ),
    "WorkspaceStatus": {
        "allOf": [
            ref("Workspace"),
            obj(
                {
                    "sha": {**MAYBE_STRING, "description": "the branch head's commit"},
                    "changes": {
                        "type": "array",
                        "description": "changes made to the workspace, newest first",
                        "items": obj(
                            {
                                "kind": STRING,
                                "from": STRING,
                                "to": STRING,
                                "by": MAYBE_STRING,
                                "at": TIME,
                            }
                        ),
                    },
                    "project_yaml_error": {
                        **MAYBE_STRING,
                        "description": "why project.yaml at the branch head cannot be used",
                    },
                    "actions": {
                        "type": "array",
                        "items": obj({"name": STRING, "needs": NAMES, "status": MAYBE_STRING}),
                    },
                }
            ),
        ]
    },
    "NewJobRequest": obj(
        {"actions": NAMES},
        {
            "force_run_dependencies": {"type": "boolean"},
            "notify": {"type": "boolean"},
            "commit": {
                "type": "string",
                "description": "a commit of the workspace's branch to run (its sha, or an "
                "unambiguous start of it); default: the branch's head",
            },
        },
    ),
    "WorkspaceChange": obj({"branch": {"type": "string", "minLength": 1}}),
    "ChangedWorkspace": {
        "allOf": [
            ref("Workspace"),
            obj({"changed": {"type": "boolean"}, "message": STRING}),
        ]
    },
    "Status": obj(
        {
            "running": {"type": "integer"},
            "pending": {"type": "integer"},
            "workers": obj({"in_use": {"type": "integer"}, "total": {"type": "integer"}}),
            "paused": {"type": "boolean"},
            "oldest_waiting_since": MAYBE_TIME,
            "oldest_waiting_seconds": {"type": ["number", "null"]},
            "docker": obj({"ok": {"type": "boolean"}, "message": STRING}),
            "disk": obj(
                {
                    "ok": {"type": "boolean"},
                    "free_bytes": {"type": "integer"},
                    "needed_bytes": {"type": "integer"},
                    "message": STRING,
                }
            ),
            "workspaces": {
                "type": "array",
                "items": obj(
                    {
                        "workspace": STRING,
                        "running": {"type": "integer"},
                        "pending": {"type": "integer"},
                    }
                ),
            },
            "other_workspaces": obj(
                {"running": {"type": "integer"}, "pending": {"type": "integer"}}
            ),
            "waiting": {
                "type": "array",
                "description": "waiting jobs in the order they should start (the first 100)",
                "items": obj(
                    {
                        "job_id": STRING,
                        "workspace": STRING,
                        "action": STRING,
                        "status_code": STRING,
                        "created_at": TIME,
                        "expected_start_at": MAYBE_TIME,
                        "expected_start_in_seconds": {"type": ["number", "null"]},
                    }
                ),
            },
        }
    ),
    "Job": obj(
        {
            "id": STRING,
            "job_request_id": {"type": "integer"},
            "action": STRING,
            "run_command": STRING,
            "state": {"type": "string", "enum": [state.value for state in State]},
            "status_code": STRING,
            "status_message": STRING,
            "created_at": TIME,
            "started_at": MAYBE_TIME,
            "completed_at": MAYBE_TIME,
            "exit_code": {"type": ["integer", "null"]},
            "metrics": obj(
                {
                    name: {"type": ["number", "null"], "description": what}
                    for name, what in (
                        ("cpu_mean", "mean CPU use while it ran, in percent of one core"),
                        ("cpu_peak", "peak CPU use, in percent of one core"),
                        ("memory_mean_mb", "mean memory use, in MB"),
                        ("memory_peak_mb", "peak memory use, in MB"),
                    )
                }
            ),
        },
        {
            "workspace": STRING,
            "log_excerpt": {
                **STRING,
                "description": "a failed job's last log lines; only to those who may read "
                "its log (output viewers)",
            },
            "expected_start_at": {
                **MAYBE_TIME,
                "description": "when a waiting job should start, from its place in the queue "
                "and recent runtimes of its action; null once started, or while paused",
            },
        },
    ),
    "JobRequest": obj(
        {
            "id": {"type": "integer"},
            "workspace": STRING,
            "branch": STRING,
            "sha": STRING,
            "requested_actions": NAMES,
            "force_run_dependencies": {"type": "boolean"},
            "created_at": TIME,
            "status": STRING,
            "status_message": STRING,
            "jobs": {"type": "array", "items": ref("Job")},
        },
        {"cancelled": {**NAMES, "description": "ids of the jobs this call cancelled"}},
    ),
    "Cancel": obj({}, {"actions": {**NAMES, "description": "default: every job"}}),
    "Manifest": obj(
        {
            "actions": {
                "type": "object",
                "description": "action -> its latest successful run: job, commit, files, "
                "definition (run, args, needs), inputs (action -> job read), out_of_date",
            },
            "files": {
                "type": "object",
                "description": "path -> action, job, level, size, sha256, visible, out_of_date "
                "(why the file is out of date, or null)",
            },
            "sha": {**MAYBE_STRING, "description": "the branch head out_of_date is judged by"},
            "project_yaml_error": {
                **MAYBE_STRING,
                "description": "why project.yaml could not be read (then nothing is out of date)",
            },
        }
    ),
    "Queue": obj(
        {
            "paused": {"type": "boolean"},
            "blocked": {**MAYBE_STRING, "description": "why no job can start, if none can"},
            "max_workers": {"type": "integer"},
            "running": {
                "type": "array",
                "items": obj(
                    {
                        "job_id": STRING,
                        "job_request_id": {"type": "integer"},
                        "action": STRING,
                        "workspace": STRING,
                        "user": STRING,
                        "priority": {"type": "integer"},
                        "phase": STRING,
                    }
                ),
            },
            "queued": {
                "type": "array",
                "items": obj(
                    {
                        "position": {"type": "integer"},
                        "job_id": STRING,
                        "job_request_id": {"type": "integer"},
                        "action": STRING,
                        "workspace": STRING,
                        "user": STRING,
                        "priority": {"type": "integer"},
                        "status_code": STRING,
                        "status_message": STRING,
                        "waiting_on": NAMES,
                    }
                ),
            },
            "queued_total": {"type": "integer"},
        }
    ),
    "QueueSwitch": obj({"paused": {"type": "boolean"}, "message": STRING}),
    "NewPriority": obj({"priority": {"type": "integer", "minimum": -1000, "maximum": 1000}}),
    "Priority": obj(
        {
            "id": {"type": "integer"},
            "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
        }
    ),
    "Outbox": obj(
        {
            "smtp_configured": {"type": "boolean"},
            "emails": {
                "type": "array",
                "items": obj(
                    {
                        "id": {"type": "integer"},
                        "job_id": MAYBE_STRING,
                        "to": STRING,
                        "subject": STRING,
                        "body": STRING,
                        "status": {
                            "type": "string",
                            "enum": ["sent", "gave_up", "not_sent_smtp_not_configured", "waiting"],
                        },
                        "attempts": {"type": "integer"},
                        "last_error": MAYBE_STRING,
                        "next_attempt_at": MAYBE_TIME,
                        "sent_at": MAYBE_TIME,
                        "created_at": TIME,
                    }
                ),
            },
        }
    ),
    "Repos": obj(
        {
            "repos": {
                "type": "array",
                "items": obj(
                    {
                        "full_name": STRING,
                        "url": STRING,
                        "private": {"type": "boolean"},
                        "default_branch": MAYBE_STRING,
                    }
                ),
            }
        }
    ),
}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    response: str | None  # schema name of the success body; None for no body
    status: int = 200
    body: str | None = None  # schema name of the JSON request body
    auth: str = "optional"  # "none", "optional" (public sites) or "required"
    errors: tuple[int, ...] = (401, 403, 404)
    media_type: str = "application/json"
    description: str = ""
    query: dict[str, dict[str, Any]] = field(default_factory=dict)  # optional query parameters


OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/api/v1/health", "Is the site up", "Health", auth="none", errors=(401,)),
    Operation("get", "/api/v1/openapi.json", "This description of the API", None, auth="none",
              errors=(), media_type="application/json"),
    Operation("get", "/api/v1/github/repos", "Your GitHub repositories", "Repos",
              auth="required", errors=(400, 401, 404, 502),
              description="Needs a browser session that signed in with GitHub."),
    Operation("post", "/api/v1/projects", "Create a project", "Project", 201, "NewProject",
              auth="required", errors=(400, 401)),
    Operation("get", "/api/v1/projects/{slug}/members", "A project's members", "Members"),
    Operation("post", "/api/v1/projects/{slug}/members", "Add a member, or set their roles",
              "Member", body="NewMember", auth="required", errors=(400, 401, 403, 404),
              description="Needs the developer role; you can give only roles you hold."),
    Operation("delete", "/api/v1/projects/{slug}/members/{username}", "Remove a member", None,
              204, auth="required"),
    Operation("post", "/api/v1/projects/{slug}/workspaces", "Create a workspace", "Workspace",
              201, "NewWorkspace", auth="required", errors=(400, 401, 403, 404)),
    Operation("get", "/api/v1/workspaces/{name}", "A workspace and its actions' statuses",
              "WorkspaceStatus"),
    Operation("patch", "/api/v1/workspaces/{name}", "Change a workspace's branch",
              "ChangedWorkspace", body="WorkspaceChange", auth="required",
              errors=(400, 401, 403, 404),
              description="Needs the developer role. The branch must exist and hold a "
              "project.yaml; the change is recorded and shown on the workspace."),
    Operation("post", "/api/v1/workspaces/{name}/job-requests", "Run actions", "JobRequest",
              201, "NewJobRequest", auth="required", errors=(400, 401, 403, 404),
              description="Needs the developer role."),
    Operation("get", "/api/v1/workspaces/{name}/outputs", "A workspace's outputs", "Manifest",
              description="Needs the output_viewer role."),
    Operation("get", "/api/v1/job-requests/{id}", "A job request and its jobs", "JobRequest"),
    Operation("post", "/api/v1/job-requests/{id}/cancel", "Cancel a job request's jobs",
              "JobRequest", body="Cancel", auth="required", errors=(400, 401, 403, 404),
              description="Needs the developer role."),
    Operation("get", "/api/v1/jobs/{id}", "A job", "Job"),
    Operation("get", "/api/v1/jobs/{id}/log", "A job's log", "Log", media_type="text/plain",
              description="Needs the output_viewer role."),
    Operation("get", "/api/v1/status", "The queue in the open: running and waiting jobs, "
              "workers, Docker and disk health, and when waiting jobs should start", "Status",
              errors=(401,),
              description="Public when the site's public_status is on, else for signed-in "
              "users."),
    Operation("get", "/api/v1/admin/queue", "The queue: running jobs, then waiting ones in order",
              "Queue", auth="required", errors=(400, 401, 403), description="For site admins.",
              query={"limit": {"type": "integer", "minimum": 0,
                               "description": "at most this many waiting jobs (default 1000)"}}),
    Operation("post", "/api/v1/admin/queue/pause", "Pause the queue: no new job starts",
              "QueueSwitch", auth="required", errors=(401, 403), description="For site admins."),
    Operation("post", "/api/v1/admin/queue/resume", "Resume the queue", "QueueSwitch",
              auth="required", errors=(401, 403), description="For site admins."),
    Operation("post", "/api/v1/job-requests/{id}/priority",
              "Set a job request's priority: higher starts sooner among one user's jobs",
              "Priority", body="NewPriority", auth="required", errors=(400, 401, 403, 404),
              description="For site admins."),
    Operation("get", "/api/v1/admin/outbox", "The newest emails, sent or waiting", "Outbox",
              auth="required", errors=(401, 403), description="For site admins."),
)  # fmt: skip

# path parameters, by the path segment before them
PARAMETERS: dict[str, dict[str, Any]] = {
    "projects": {"description": "the project's slug, as in its page's address", **STRING},
    "members": {"description": "a member's username", **STRING},
    "workspaces": {"description": "the workspace's name", **STRING},
    "job-requests": {"description": "the job request's number", "type": "integer"},
    "jobs": {"description": "the job's id", **STRING},
}

ERROR_TEXT = {
    400: "The request is not valid; the error says why",
    401: "Sign in, or send a valid API token",
    403: "You lack the role this needs",
    404: "There is no such thing",
    409: "It conflicts with what exists",
    502: "GitHub did not answer as expected",
}


def build() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": VERSION,
            "description": "Run research pipelines. Send `Authorization: Bearer <token>` "
            '(create tokens on your account page). Errors are `{"error": "..."}`.',
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(op: Operation) -> dict[str, Any]:
    params = []
    for before, name in re.findall(r"([\w-]+)/{(\w+)}", op.path):
        schema = dict(PARAMETERS[before])
        description = schema.pop("description")
        params.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": description,
                "schema": schema,
            }
        )
    for name, spec in op.query.items():
        schema = dict(spec)
        description = schema.pop("description")
        params.append({"name": name, "in": "query", "description": description, "schema": schema})
    success: dict[str, Any] = {"description": op.summary}
    if op.response == "Log":
        success["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif op.response is not None:
        success["content"] = {op.media_type: {"schema": ref(op.response)}}
    elif op.status != 204:
        success["content"] = {op.media_type: {"schema": {"type": "object"}}}
    responses = {str(op.status): success}
    for status in op.errors:
        responses[str(status)] = {
            "description": ERROR_TEXT[status],
            "content": {"application/json": {"schema": ref("Error")}},
        }
    result: dict[str, Any] = {
        "operationId": f"{op.method}_{re.sub(r'[^a-z0-9]+', '_', op.path[8:]).strip('_')}",
        "summary": op.summary,
        "parameters": params,
        "responses": responses,
        "security": {"none": [], "optional": [{}, {"token": []}], "required": [{"token": []}]}[
            op.auth
        ],
    }
    if op.description:
        result["description"] = op.description
    if op.body:
        result["requestBody"] = {
            "required": op.body != "Cancel",
            "content": {"application/json": {"schema": ref(op.body)}},
        }
    return result


@functools.cache
def document() -> dict[str, Any]:
    return build()
