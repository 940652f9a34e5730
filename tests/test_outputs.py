"""Output patterns, what counts as an output, what an output viewer may see, the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobsite.outputs import (
    Manifest,
    OutputError,
    UnreadableOutput,
    check_visibility,
    csv_preview,
    match_outputs,
    pattern_matches,
    read_output,
)

LIMIT = 1024**2


def make(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("output/*.csv", "output/a.csv", True),
        ("output/*.csv", "output/sub/a.csv", False),
        ("output/*", "output/a.csv", True),
        ("*/a.csv", "output/a.csv", True),
        ("output/a.csv", "output/a.csv", True),
        ("output/a.csv", "output/A.csv", False),
        ("output/*.csv", "other/a.csv", False),
    ],
)
def test_star_matches_within_one_path_segment(pattern, path, matches):
    assert pattern_matches(pattern, path) is matches


def test_matched_files_with_their_levels(tmp_path):
    make(tmp_path, {"output/a.csv": "1", "output/b.csv": "2", "output/m.rds": "3", "x.py": ""})
    outputs = {
        "moderately_sensitive": {"tables": "output/*.csv"},
        "highly_sensitive": {"model": "output/m.rds"},
    }
    assert match_outputs(tmp_path, outputs, LIMIT) == {
        "output/a.csv": "moderately_sensitive",
        "output/b.csv": "moderately_sensitive",
        "output/m.rds": "highly_sensitive",
    }


def test_a_directory_is_not_an_output(tmp_path):
    (tmp_path / "output" / "tables.csv").mkdir(parents=True)
    with pytest.raises(OutputError) as caught:
        match_outputs(tmp_path, {"highly_sensitive": {"t": "output/*.csv"}}, LIMIT)
    assert caught.value.status_code == "unmatched_patterns"


def test_unmatched_patterns_list_close_files(tmp_path):
    make(tmp_path, {"output/count.csv": "1", "output/other.txt": "", "analysis/x.py": ""})
    outputs = {"moderately_sensitive": {"c": "output/counts.csv", "g": "output/*.png"}}
    with pytest.raises(OutputError) as caught:
        match_outputs(tmp_path, outputs, LIMIT)
    error = caught.value
    assert error.status_code == "unmatched_patterns"
    assert error.message.startswith("No outputs found matching patterns: output/counts.csv (")
    assert "output/count.csv" in error.message
    assert "output/*.png" in error.message
    assert "analysis/x.py" not in error.message


def test_a_linked_file_is_refused(tmp_path):
    make(tmp_path, {"output/real.csv": "1"})
    os.symlink("/etc/passwd", tmp_path / "output/a.csv")
    with pytest.raises(OutputError, match=r"output/a.csv is a symbolic link"):
        match_outputs(tmp_path, {"highly_sensitive": {"a": "output/*.csv"}}, LIMIT)


def test_a_link_inside_the_job_dir_is_refused_too(tmp_path):
    make(tmp_path, {"output/real.csv": "1"})
    os.symlink("real.csv", tmp_path / "output/a.csv")
    with pytest.raises(OutputError, match=r"output/a.csv is a symbolic link"):
        match_outputs(tmp_path, {"highly_sensitive": {"a": "output/a.csv"}}, LIMIT)


def test_a_linked_directory_is_not_followed(tmp_path):
    outside = make(tmp_path / "outside", {"secret.csv": "s"})
    job = tmp_path / "job"
    job.mkdir()
    os.symlink(outside, job / "output")
    with pytest.raises(OutputError) as caught:
        match_outputs(job, {"highly_sensitive": {"a": "output/*.csv"}}, LIMIT)
    assert "output is a symbolic link, where output pattern output/*.csv" in caught.value.message
    assert "secret" not in caught.value.message


def test_a_fifo_is_refused(tmp_path):
    (tmp_path / "output").mkdir()
    os.mkfifo(tmp_path / "output/a.csv")
    with pytest.raises(OutputError, match=r"output/a.csv is a fifo, not a regular file"):
        match_outputs(tmp_path, {"highly_sensitive": {"a": "output/*.csv"}}, LIMIT)


def test_an_output_over_the_size_limit_is_refused(tmp_path):
    make(tmp_path, {"output/big.csv": "x" * 101})
    with pytest.raises(OutputError, match=r"output/big.csv is 101 bytes, larger than .* 100"):
        match_outputs(tmp_path, {"highly_sensitive": {"a": "output/*.csv"}}, 100)


@pytest.mark.parametrize(
    ("name", "text", "level", "visible", "reason"),
    [
        ("a.csv", "n\n1\n", "moderately_sensitive", True, None),
        ("a.csv", "n\n1\n", "highly_sensitive", False, "highly_sensitive outputs are never shown"),
        ("a.csv", "Patient_ID,n\n1,2\n", "moderately_sensitive", False, "has a patient_id column"),
        ("a.csv", "n\n" + "1\n" * 5001, "moderately_sensitive", False, "has 5001 rows"),
        ("a.csv", "n\n" + "1\n" * 5000, "moderately_sensitive", True, None),
        ("a.rds", "x", "moderately_sensitive", False, "files of type .rds are not shown"),
        ("a.png", "x", "moderately_sensitive", True, None),
    ],
)
def test_what_an_output_viewer_may_see(tmp_path, name, text, level, visible, reason):
    path = make(tmp_path, {name: text}) / name
    seen, why = check_visibility(path, level)
    assert seen is visible
    assert (why or "").startswith(reason or "")


def test_visibility_of_a_file_under_a_temporary_name(tmp_path):
    path = make(tmp_path, {".a.csv.123.tmp": "patient_id\n1\n"}) / ".a.csv.123.tmp"
    assert check_visibility(path, "moderately_sensitive", suffix=".csv") == (
        False,
        "has a patient_id column",
    )


def test_a_manifest_records_actions_and_files(tmp_path):
    manifest = Manifest()
    manifest.record_action("a", "job1", "abc", {"output/x.csv": {"level": "highly_sensitive"}})
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata/manifest.json").write_text(manifest.dumps())
    loaded = Manifest.load(tmp_path)
    assert loaded.action_files("a") == ["output/x.csv"]
    assert not loaded.outputs_exist(tmp_path, "a")
    make(tmp_path, {"output/x.csv": ""})
    assert loaded.outputs_exist(tmp_path, "a")
    loaded.record_action("a", "job2", "def", {})
    assert loaded.data["files"] == {}


def test_a_manifest_from_opensafely_run_is_not_ours(tmp_path):
    theirs = {
        "workspace": "study",
        "repo": None,
        "actions": {"a": {"state": "succeeded", "commit": None}},
        "files": {"output/x.csv": {"created_by_action": "a"}},
    }
    make(tmp_path, {"metadata/manifest.json": json.dumps(theirs)})
    assert Manifest.load(tmp_path).data == {"actions": {}, "files": {}}


def test_close_files_are_the_ones_the_job_made(tmp_path):
    make(tmp_path, {"output/input.csv": "from a needed action", "output/count.csv": "1"})
    os.utime(tmp_path / "output/input.csv", (1000, 1000))  # copied in before the job ran
    with pytest.raises(OutputError) as caught:
        match_outputs(tmp_path, {"highly_sensitive": {"c": "output/counts.csv"}}, LIMIT, 2000)
    assert "output/count.csv" in caught.value.message
    assert "input.csv" not in caught.value.message


def test_an_output_is_read_only_as_a_plain_file_inside_the_workspace(tmp_path):
    (tmp_path / "output").mkdir()
    (tmp_path / "output/a.csv").write_text("n\n1\n")
    assert read_output(tmp_path, "output/a.csv") == b"n\n1\n"
    for rel in ("", "/etc/passwd", "output/../output/a.csv", "output//a.csv", "./output/a.csv"):
        with pytest.raises(UnreadableOutput, match="not a path inside the workspace"):
            read_output(tmp_path, rel)
    with pytest.raises(UnreadableOutput, match="larger than 3 bytes"):
        read_output(tmp_path, "output/a.csv", limit=3)
    with pytest.raises(UnreadableOutput, match="not in the workspace"):
        read_output(tmp_path / "missing", "output/a.csv")
    with pytest.raises(UnreadableOutput, match="not a plain file"):
        read_output(tmp_path, "output")
    with pytest.raises(UnreadableOutput, match="not a plain file"):
        read_output(tmp_path, "output/nope.csv")


def test_a_csv_preview_counts_every_row_and_the_widest_row():
    data = b"a\tb\n" + b"".join(b"%d\t%d\n" % (i, i) for i in range(5)) + b"1\t2\t3\n"
    table = csv_preview(data, "\t", rows=2)
    assert table == {
        "header": ["a", "b"],
        "rows": [["0", "0"], ["1", "1"]],
        "total_rows": 6,
        "total_columns": 3,
    }
    assert csv_preview(b"") == {"header": [], "rows": [], "total_rows": 0, "total_columns": 0}
