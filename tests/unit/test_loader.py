"""carnet._loader: ``module:attribute`` specs; a clear ConfigurationError for each fault."""

from __future__ import annotations

import pytest

from carnet._loader import load
from carnet.errors import ConfigurationError


def test_a_spec_names_a_module_attribute_or_a_dotted_path() -> None:
    import carnet.envelope

    assert load("carnet.envelope:Sealer", what="--x") is carnet.envelope.Sealer
    assert load("carnet.envelope:Sealer.seal", what="--x") is carnet.envelope.Sealer.seal


@pytest.mark.parametrize(
    "spec", ["carnet.envelope", ":Sealer", "carnet.envelope:", "carnet:a..b", ".envelope:Sealer"]
)
def test_a_malformed_spec_says_what_is_expected(spec: str) -> None:
    with pytest.raises(
        ConfigurationError, match=r"--index .*expected MODULE:ATTRIBUTE, e\.g\. m:C\.a"
    ):
        load(spec, what="--index", example="m:C.a")


def test_a_module_that_cannot_be_imported_is_named() -> None:
    with pytest.raises(
        ConfigurationError, match=r"--app 'nowhere_at_all:Base': cannot import 'nowhere_at_all'"
    ):
        load("nowhere_at_all:Base", what="--app")


def test_a_missing_attribute_names_where_it_was_looked_for() -> None:
    with pytest.raises(ConfigurationError, match=r"'carnet.envelope' has no attribute 'Nope'"):
        load("carnet.envelope:Nope", what="--app")
    with pytest.raises(
        ConfigurationError, match=r"'carnet.envelope:Sealer' has no attribute 'nope'"
    ):
        load("carnet.envelope:Sealer.nope", what="--app")
