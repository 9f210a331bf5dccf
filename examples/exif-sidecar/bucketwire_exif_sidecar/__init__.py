"""Write an image's EXIF/IPTC metadata as a JSON sidecar object next to it.

Why a sidecar: search indexers, catalogues and humans can read a small JSON object without fetching and
decoding megabytes of image. It is an example of a third-party plugin, so it uses only bucketwire's public API.
Re-running on a redelivered event rewrites the same sidecar, so the work is idempotent.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import ExifTags, Image, IptcImagePlugin, UnidentifiedImageError

from bucketwire import ConfigError, Event, PermanentError, hookimpl, with_defaults

PLUGIN_NAME = "exif-sidecar"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".png")
DEFAULTS: dict[str, Any] = {
    "store": None,
    "output_bucket": None,
    "suffix": ".exif.json",
    "max_bytes": 32 << 20,
    "topic": "exif-extracted",
}
IPTC_NAMES = {(2, 5): "object_name", (2, 25): "keywords", (2, 80): "byline", (2, 90): "city",
              (2, 101): "country", (2, 105): "headline", (2, 116): "copyright", (2, 120): "caption"}


@hookimpl
def validate_settings(settings: dict[str, Any]) -> dict[str, Any]:
    s = with_defaults(settings, DEFAULTS)
    if not isinstance(s["suffix"], str) or not s["suffix"]:
        raise ConfigError("suffix: expected a non-empty string such as '.exif.json'")
    if not isinstance(s["max_bytes"], int) or s["max_bytes"] <= 0:
        raise ConfigError("max_bytes: expected a positive integer")
    return s


def _jsonable(v: Any) -> Any:
    """EXIF values are bytes, rationals and tuples; make them JSON without losing meaning."""
    if isinstance(v, bytes):
        text = v.rstrip(b"\x00")
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError:
            return text.hex()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, int | str | bool) or v is None:
        return v
    try:
        return float(v)  # IFDRational and friends
    except (TypeError, ValueError):
        return str(v)


def extract(data: bytes) -> dict[str, Any]:
    """EXIF (main IFD, Exif IFD and GPS) and IPTC of an image, keyed by readable tag names."""
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise PermanentError(f"not a readable image: {e}") from None
    with img:
        exif = img.getexif()
        out: dict[str, Any] = {"format": img.format, "width": img.width, "height": img.height}
        tags = {ExifTags.TAGS.get(k, str(k)): _jsonable(v) for k, v in exif.items()}
        for ifd_id, name in ((ExifTags.IFD.Exif, "exif"), (ExifTags.IFD.GPSInfo, "gps")):
            sub = exif.get_ifd(ifd_id)
            if sub:
                table = ExifTags.GPSTAGS if name == "gps" else ExifTags.TAGS
                tags[name] = {table.get(k, str(k)): _jsonable(v) for k, v in sub.items()}
        for k in ("ExifOffset", "GPSInfo"):
            if not isinstance(tags.get(k), dict):
                tags.pop(k, None)
        out["exif"] = tags
        iptc = IptcImagePlugin.getiptcinfo(img) or {}
        out["iptc"] = {IPTC_NAMES.get(k, f"{k[0]}:{k[1]}"): _jsonable(v) for k, v in iptc.items()}
        out["orientation"] = tags.get("Orientation", 1)
    return out


def sidecar_key(key: str, settings: dict[str, Any]) -> str:
    return key + settings["suffix"]


@hookimpl
def handle_event(event: Event, ctx: Any) -> None:
    s = ctx.settings
    key = event.key
    if not key or key.endswith(s["suffix"]) or not key.lower().endswith(IMAGE_SUFFIXES):
        return  # not an image, or our own output: never recurse
    store = ctx.store(s["store"])
    out_bucket = s["output_bucket"] or event.bucket
    out_key = sidecar_key(key, s)
    if event.is_object_removed:
        store.remove_object(out_bucket, out_key)
        return
    if not event.is_object_created:
        return
    size = (event.data or {}).get("size") or 0
    if size > s["max_bytes"]:
        raise PermanentError(f"{event.bucket}/{key} is {size} bytes; max_bytes is {s['max_bytes']}")
    resp = store.get_object(event.bucket, key)
    try:
        data = resp.read(s["max_bytes"] + 1)
    finally:
        resp.close()
        resp.release_conn()
    if len(data) > s["max_bytes"]:
        raise PermanentError(f"{event.bucket}/{key} exceeds max_bytes {s['max_bytes']}")
    meta = extract(data)
    meta["source"] = {"bucket": event.bucket, "key": key, "etag": (event.data or {}).get("etag", "")}
    body = json.dumps(meta, indent=1, sort_keys=True).encode()
    store.put_object(out_bucket, out_key, io.BytesIO(body), len(body), content_type="application/json")
    ctx.publish(s["topic"], {"bucket": out_bucket, "key": out_key, "source_bucket": event.bucket,
                             "source_key": key, "orientation": meta["orientation"]}, subject=out_key)
