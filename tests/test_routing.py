from bucketwire import Event
from bucketwire.config import Route
from bucketwire.hub.routing import Router


def ev(t, b, k):
    return Event(id="1", source="s", type=t, data={"bucket": b, "key": k})


def test_first_match_wins_and_default_topic():
    r = Router([
        Route("jpgs", ["s3:ObjectCreated:*"], bucket="photos", suffix=".jpg"),
        Route("raw", ["s3:ObjectCreated:*"], bucket="photos", prefix="raw/"),
        Route("deletes", ["s3:ObjectRemoved:*"]),
        Route("any-photos", ["*"], bucket="pho*"),
    ], default_topic="other")
    assert r.topic_for(ev("s3:ObjectCreated:Put", "photos", "raw/a.jpg")) == "jpgs"
    assert r.topic_for(ev("s3:ObjectCreated:Copy", "photos", "raw/a.png")) == "raw"
    assert r.topic_for(ev("s3:ObjectRemoved:Delete", "x", "a")) == "deletes"
    assert r.topic_for(ev("s3:ObjectAccessed:Get", "photos2", "a")) == "any-photos"
    assert r.topic_for(ev("s3:ObjectAccessed:Get", "docs", "a")) == "other"
    assert Router([]).topic_for(ev("s3:ObjectCreated:Put", "b", "k")) is None
