"""A bulk's filter as the API checks it against its entity type's listing, and as the page
activity reads it: one the checks came after still lists, matching what it matched."""

from __future__ import annotations

import pytest

from entities import catalog
from workers.bulk import list_filter


def test_the_api_s_checks_do_not_stop_a_bulk_started_before_them() -> None:
    account = catalog.entity_types()["account"]
    older = {"tags": {"nope": ["x"]}, "text": "z" * 300}
    with pytest.raises(ValueError, match="no tag nope"):
        list_filter(older, account)
    where = list_filter(older)  # the page activity's reading: it matches nothing, as before
    assert (set(where.tags), where.text) == ({"nope"}, "z" * 300)


def test_statuses_come_from_each_entity_s_declaration() -> None:
    types = catalog.entity_types()
    assert types["account"].statuses() == frozenset(
        {"PENDING", "ACTIVE", "DORMANT", "SUSPENDED", "CLOSED"}
    )
    assert types["cart"].statuses() == frozenset(
        {"OPEN", "CHECKING_OUT", "CHECKED_OUT", "ABANDONED", "DISCARDED"}
    )
    assert types["inventory"].statuses() is None  # it lists no status
