"""Fixtures for the benchmark tests: each module defines ``run`` (its --quick process)."""
import pytest
from benchjson import json_records


@pytest.fixture(scope="module")
def records(run):
    """The JSON lines the module's benchmark printed on stdout."""
    return json_records(run.stdout)
