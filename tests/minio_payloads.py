"""MinIO webhook bodies built field for field the way MinIO's webhook target sends them.

MinIO (internal/event/event.go, internal/event/target/webhook.go) posts {"EventName", "Key", "Records": [one]}
where `Key` is "bucket/" + the decoded object name and the record's `s3.object.key` is Go url.QueryEscape'd.
`size`, `eTag`, `contentType`, `userMetadata` and `versionId` carry `omitempty`, so removals omit them.
"""

from __future__ import annotations

import json
from urllib.parse import quote_plus


def go_query_escape(s: str) -> str:
    """Go's url.QueryEscape: space -> '+', everything but [A-Za-z0-9-_.~] percent-encoded (UTF-8)."""
    return quote_plus(s, safe="")


def record(event: str, bucket: str, key: str, *, size: int = 0, etag: str = "", content_type: str = "",
           version: str = "", sequencer: str = "17C5D1A3B6D4E8F2", request_id: str = "17C5D1A3B6C2A1F0",
           user_metadata: dict | None = None, source_ip: str = "192.0.2.10") -> dict:
    obj: dict = {"key": go_query_escape(key)}
    if size:
        obj["size"] = size
    if etag:
        obj["eTag"] = etag
    if content_type:
        obj["contentType"] = content_type
    if user_metadata:
        obj["userMetadata"] = user_metadata
    if version:
        obj["versionId"] = version
    obj["sequencer"] = sequencer
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": "2024-05-01T10:00:00.123Z",
        "eventName": event,
        "userIdentity": {"principalId": "minioadmin"},
        "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": source_ip},
        "responseElements": {
            "x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
            "x-amz-request-id": request_id,
            "x-minio-deployment-id": "8ae1c1e5-4ef1-4b0e-a7fa-5d2b0b5d0f4c",
            "x-minio-origin-endpoint": "http://10.0.0.1:9000",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
        "source": {"host": source_ip, "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70 mc/RELEASE"},
    }


def body(*records: dict) -> bytes:
    r0 = records[0]
    key = r0["s3"]["bucket"]["name"] + "/" + r0["s3"]["object"]["key"]
    from urllib.parse import unquote_plus

    return json.dumps({"EventName": r0["eventName"], "Key": unquote_plus(key), "Records": list(records)}).encode()


def ceph_record(event: str, bucket: str, key: str, *, size: int = 0, etag: str = "", request_id: str = "R1",
                zonegroup: str = "default") -> dict:
    """A Ceph RGW notification record, field for field as `rgw_pubsub_s3_event::dump` (src/rgw/rgw_pubsub.cc)
    writes it. Unlike MinIO and AWS, RGW puts the object's name in `s3.object.key` as it is
    (`event.object_key = obj->get_name()` in rgw_notify.cc): no URL encoding."""
    return {
        "eventVersion": "2.2",
        "eventSource": "ceph:s3",
        "awsRegion": zonegroup,
        "eventTime": "2024-05-01T10:00:00.123456Z",
        "eventName": event,
        "userIdentity": {"principalId": "tester"},
        "requestParameters": {"sourceIPAddress": ""},
        "responseElements": {"x-amz-request-id": request_id, "x-amz-id-2": "1016-default-default"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "bucketwire",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "tester"},
                       "arn": f"arn:aws:s3:{zonegroup}::{bucket}", "id": "7d3a3b0e-2f1c-4f35-9d71-0f3c6a1d2b4e.4137.1"},
            "object": {"key": key, "size": size, "eTag": etag, "versionId": "", "sequencer": "6A1F3C5D2B4E7F10",
                       "metadata": [], "tags": []},
        },
        "eventId": "1714557600.123456.d41d8cd98f00b204e9800998ecf8427e",
        "opaqueData": "",
    }
