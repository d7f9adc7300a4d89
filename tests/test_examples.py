"""The shipped example rosters load as they are."""

from pathlib import Path

import pytest

from fleetbus.config import load_roster

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_roster_loads(path):
    fleet = load_roster(path)
    assert fleet.slots
    for slot in fleet.slots.values():
        assert Path(slot.workdir).is_absolute()


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"minimal.yaml", "software-factory.yaml"}
