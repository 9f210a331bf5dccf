"""The descendant budget's bookkeeping (hub/lineage.py); the hub's use of it is in test_delivery.py."""

from __future__ import annotations

import orjson

from bucketwire.hub.lineage import Descendants, lineage_of


def test_an_upload_gets_its_budget_and_no_more_and_another_its_own() -> None:
    d = Descendants(3)
    assert [d.take(("urn:s", "a")) for _ in range(5)] == [True, True, True, False, False]
    assert d.take(("urn:s", "b"))
    assert not d.take(("urn:s", "a")), "a refusal spends nothing and gives nothing back"


def test_the_source_is_part_of_the_upload() -> None:
    """Ids are unique per source only: another source's event of the same id is another upload."""
    d = Descendants(1)
    assert d.take(("urn:one", "x")) and d.take(("urn:two", "x"))
    assert not d.take(("urn:one", "x"))
    assert d.take(("urn:one\0x", "")), "no two (source, id) pairs share a key through the separator"


def test_the_least_recently_charged_upload_is_forgotten_first() -> None:
    d = Descendants(2, max_roots=2)
    assert d.take(("s", "old")) and d.take(("s", "old"))
    assert d.take(("s", "mid"))
    assert not d.take(("s", "old")), "charged (refused) just now: the most recent"
    assert d.take(("s", "new"))  # over max_roots: "mid" goes, not "old"
    assert not d.take(("s", "old"))
    assert d.take(("s", "mid")) and d.take(("s", "mid")), "forgotten, so counted afresh"


def test_lineage_of_an_upload_is_itself_and_of_a_follow_on_its_root() -> None:
    upload = orjson.dumps({"id": "u1", "source": "urn:store", "hops": 0, "data": {"k": [1, 2]}})
    follow = orjson.dumps({"id": "f1", "source": "bucketwire://hub/follow-on/g/p", "hops": 2,
                           "rootsource": "urn:store", "rootid": "u1"})
    assert lineage_of(upload) == (0, ("urn:store", "u1"))
    assert lineage_of(follow) == (2, ("urn:store", "u1"))
    assert lineage_of(b"not json") == (0, ("", ""))
