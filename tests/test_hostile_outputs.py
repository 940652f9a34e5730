"""Hostile outputs: files a job writes to get patient-level data shown, or to break the
site's judgement of them. Each scenario runs a real job in a real container through the
site, and ends with the intact check."""

from __future__ import annotations

import pytest
from helpers import setup_workspace, submit, wait_for_request

pytestmark = pytest.mark.usefixtures("docker_cleanup")

PROJECT = """\
version: "4"
actions:
  tables:
    run: python:v2 make.sh
    outputs:
      moderately_sensitive:
        csv: output/*.csv
        txt: output/*.txt
"""
MAKE = "mkdir -p output && cp fixtures/* output/\n"
WIDE = b"x" * 200_000  # one field over the csv module's 128 KiB limit
PID_CSV = "patient_id,n\n1,2\n"
NOT_UTF8 = "is not UTF-8 text"
HAS_PID = "has a patient_id column"

# file the job writes -> (its bytes, why it is not shown, or None: shown)
FILES = {
    "counts.csv": (b"n,total\n1,2\n", None),
    "bom-counts.csv": (b"\xef\xbb\xbfn,total\n1,2\n", None),
    "bom.csv": (b"\xef\xbb\xbf" + PID_CSV.encode(), HAS_PID),
    "semicolons.csv": (b"patient_id;age\n1;30\n", HAS_PID),
    "utf16.csv": (PID_CSV.encode("utf-16"), NOT_UTF8),
    "utf16-no-bom.csv": (PID_CSV.encode("utf-16-le"), NOT_UTF8),
    "latin1.csv": ("n,ville\n1,Orléans\n".encode("latin-1"), NOT_UTF8),
    "header-further-down.csv": (b'\n\n"PATIENT_ID"\t n\n1\t2\n', HAS_PID),
    "tabs.txt": (b"patient_id\tn\n1\t2\n", HAS_PID),
    "table.txt": (b"patient_id n\n1 2\n", HAS_PID),
    "wide.csv": (b"n,notes\n1," + WIDE + b"\n", None),
    "wide-with-ids.csv": (b'notes,patient_id\n"' + WIDE + b'",1\n', HAS_PID),
    "unclosed-quote.csv": (b'n,notes\n1,"' + WIDE + b"\n", None),
    "long.csv": (b"n\n" + b"1\r" * 5001, "has 5001 rows"),
}


async def test_tables_are_judged_by_content_whatever_their_encoding_or_separator(
    client, settings, make_user, make_repo, intact
):
    repo = make_repo({"project.yaml": PROJECT, "make.sh": MAKE})
    for name, (content, _) in FILES.items():
        (repo.path / "fixtures").mkdir(exist_ok=True)
        (repo.path / "fixtures" / name).write_bytes(content)
    repo.git("add", "-A")
    repo.git("commit", "--quiet", "-m", "fixtures")
    alice = await make_user("alice")
    await setup_workspace(client, alice, repo)

    request = await wait_for_request(client, alice, await submit(client, alice, ["tables"]))

    (job,) = request["jobs"]
    assert job["status_code"] == "succeeded", job
    manifest = (await client.get("/api/v1/workspaces/ws1/outputs", headers=alice)).json()
    seen = {
        path.removeprefix("output/"): entry["not_visible_because"] if not entry["visible"] else None
        for path, entry in manifest["files"].items()
    }
    expected = {name: why for name, (_, why) in FILES.items()}
    assert {
        name: (why or "")[: len(expected[name] or "")] or None for name, why in seen.items()
    } == expected
    await intact.check(client, allowed=lambda path: path.startswith("repos/study"))
