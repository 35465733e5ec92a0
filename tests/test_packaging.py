"""The install is quiet: pyproject.toml uses no form setuptools deprecates, and asks no
dependency for an extra it does not provide (pip warns on both at every ``make deps``)."""

import importlib.metadata
import re
import tomllib
from typing import Any

from tests.support.azurite import REPO_ROOT

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?")


def project() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_the_license_is_an_spdx_expression_for_a_setuptools_that_reads_it() -> None:
    config = project()
    assert isinstance(config["project"]["license"], str), "a table is deprecated"
    [setuptools] = [r for r in config["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools == "setuptools>=77", "77 is the first to read an SPDX license"


def test_every_extra_asked_of_a_dependency_is_one_it_provides() -> None:
    config = project()
    requirements = [*config["project"]["dependencies"]]
    for extra in config["project"]["optional-dependencies"].values():
        requirements.extend(extra)
    asked = 0
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        assert match, requirement
        name, extras = match.group(1), match.group(2)
        if not extras:
            continue
        try:
            provided = importlib.metadata.metadata(name).get_all("Provides-Extra") or []
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional extra not installed here
        for extra in (e.strip() for e in extras.split(",")):
            asked += 1
            assert extra in provided, f"{name} does not provide the extra {extra!r}"
    assert asked, "azure-storage-queue[aio] at least"
