"""Every real project.yaml in the shared corpus gets the reference library's verdict.

The verdicts in `data/corpus_verdicts.json` were derived outside this project by loading
each corpus file with the OpenSAFELY pipeline library (github.com/opensafely-core/pipeline,
main branch, which accepts versions 1 to 5) through its `load_pipeline`: a file is valid
when that returns, invalid when it raises. `reference_error` is the first line of the
reference's message (after its "Invalid project:" heading), kept for the reader: our own
messages are worded differently, so only the verdict is compared.

The corpus lives beside the project (``../shared/corpus``, as in CI), not in it: where it is
missing these tests skip saying where it was expected, or fail with JOBSITE_REQUIRE_CORPUS=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobsite.pipeline import ProjectValidationError, load_pipeline

VERDICTS = json.loads((Path(__file__).parent / "data/corpus_verdicts.json").read_text())


def test_corpus_is_present_and_has_a_verdict_for_every_file(corpus):
    assert corpus.is_dir(), f"the shared corpus is missing: expected it at {corpus}"
    assert sorted(path.name for path in corpus.glob("*.yaml")) == sorted(VERDICTS)


@pytest.mark.parametrize("filename", sorted(VERDICTS))
def test_corpus_file_gets_the_reference_verdict(corpus, filename):
    path = corpus / filename
    assert path.is_file(), f"corpus file missing: {path}"
    expected = VERDICTS[filename]
    try:
        load_pipeline(path.read_text())
    except ProjectValidationError as exc:
        assert not expected["valid"], f"{filename} should be valid, but: {exc}"
        assert exc.errors
    else:
        assert expected["valid"], f"{filename} should be invalid: {expected['reference_error']}"
