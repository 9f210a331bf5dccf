"""Thumbnail plugin: the pure renderer, and the hooks against a real SeaweedFS through PluginHarness."""

from __future__ import annotations

import io
import itertools
import logging
import struct
import zlib
from typing import Any

import pytest
from minio.error import S3Error
from PIL import Image

import bucketwire
import bucketwire_thumbnail as thumb
from bucketwire import ConfigError, Event, PermanentError
from bucketwire.config import StoreConfig
from bucketwire.testing import PluginHarness
from bucketwire_thumbnail.imaging import render

_ids = itertools.count(1)
RED = (255, 0, 0)


# -- helpers ---------------------------------------------------------------------------------------------------
def obj_event(kind: str, bucket: str, key: str, *, size: int = 0, etag: str = "", ctype: str = "",
              md: dict[str, str] | None = None, hops: int = 0) -> Event:
    """An object event shaped like the hub's (`formats.s3_records.record_to_event`)."""
    return Event(
        id=f"t-{next(_ids)}", source="test", type=f"s3:{kind}", subject=key, hops=hops,
        data={
            "bucket": bucket, "key": key, "size": size, "etag": etag, "content_type": ctype,
            "version_id": "", "sequencer": "", "user_metadata": md or {}, "store": "primary",
            "principal": "tester", "source_ip": "127.0.0.1", "user_agent": "pytest", "records": [],
        },
    )


def upload(client: Any, bucket: str, key: str, data: bytes, ctype: str, md: dict[str, str] | None = None,
           hops: int = 0) -> Event:
    client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=ctype, metadata=md)
    st = client.stat_object(bucket, key)
    return obj_event("ObjectCreated:Put", bucket, key, size=len(data), etag=st.etag, ctype=ctype, hops=hops)


def harness(weed: Any, **settings: Any) -> PluginHarness:
    store = StoreConfig(name="primary", endpoint=weed.s3_endpoint, access_key=weed.access_key,
                        secret_key=weed.secret_key)
    return PluginHarness(thumb, settings=settings, stores={"primary": store})


def keys(client: Any, bucket: str) -> list[str]:
    return sorted(o.object_name for o in client.list_objects(bucket, recursive=True))


def jpeg_12mp(orientation: int = 6) -> bytes:
    """4000x3000 with some texture (so decoding costs what a photo costs) and a red top-left corner."""
    noise = Image.effect_noise((1000, 750), 40).resize((4000, 3000))
    im = Image.merge("RGB", (noise, Image.linear_gradient("L").resize((4000, 3000)), noise))
    im.paste(RED, (0, 0, 400, 400))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85, exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return jpeg_12mp()


def near(px: tuple[int, ...], want: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, want, strict=False))


# -- the pure renderer ------------------------------------------------------------------------------------------
def test_render_12mp_jpeg_applies_orientation_and_keeps_aspect(photo: bytes) -> None:
    out = render(photo, [256, 1024], format="jpeg")
    assert [(t.size, t.width, t.height) for t in out] == [(256, 192, 256), (1024, 768, 1024)]
    for t in out:
        im = Image.open(io.BytesIO(t.data)).convert("RGB")
        assert im.size == (t.width, t.height)
        # Orientation 6 = rotate 90 degrees clockwise for display: top-left marker ends up top-right.
        assert near(im.getpixel((im.width - 3, 3)), RED)
        assert not near(im.getpixel((3, 3)), RED)
        assert not near(im.getpixel((im.width - 3, im.height - 3)), RED)
    size, data, w, h = out[0]  # the documented tuple shape
    assert (size, w, h) == (256, 192, 256) and data[:3] == b"\xff\xd8\xff"


def test_render_decodes_a_big_jpeg_at_a_reduced_scale(photo: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes the plugin fast (`bench thumbnail` measures how fast, against plain Pillow): a 12 MP JPEG is
    decoded DCT-scaled, at the smallest 1/2^n size that still covers the largest thumbnail, not at full size and
    then shrunk. Seen from the decoder: the size it was asked to decode at. (This was a timed assertion, ours
    3x faster than plain Pillow, which a loaded machine made fail.)"""
    from PIL import JpegImagePlugin

    decoded: list[tuple[int, int]] = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def load(self: Any) -> Any:
        decoded.append(self.size)  # after draft(): the scale the decoder will produce
        return real_load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    full = Image.open(io.BytesIO(photo)).size
    out = render(photo, [256], format="webp")
    (w, h) = decoded[0]
    assert full[0] >= 4000 and w * 4 <= full[0] and h * 4 <= full[1], (full, decoded)  # at most a quarter each way
    assert max(w, h) >= 256, (full, decoded)  # still covers the thumbnail: no upscaling
    (t,) = out
    assert max(Image.open(io.BytesIO(t.data)).size) == 256


# Each orientation's stored pixels: the upright picture put through the inverse of what the tag asks a viewer
# to do, so a correct thumbnail is upright again whatever the tag.
_STORE_AS = {
    1: (), 2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,), 6: (Image.Transpose.ROTATE_90,),
    7: (Image.Transpose.TRANSVERSE,), 8: (Image.Transpose.ROTATE_270,),
}
GREEN = (0, 255, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_every_exif_orientation_comes_out_upright(fmt: str) -> None:
    """Upright = 2:1 landscape, red top-left, green top-right, for orientations 1-8 in every format that carries
    EXIF. (Pillow rotates TIFFs itself while loading; applying the tag again turned those thumbnails over.)"""
    wrong = []
    for orientation, ops in _STORE_AS.items():
        im = Image.new("RGB", (600, 300), (0, 0, 255))
        im.paste(RED, (0, 0, 60, 60))
        im.paste(GREEN, (540, 0, 600, 60))
        for op in ops:
            im = im.transpose(op)
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        im.save(buf, fmt, exif=exif)
        (t,) = render(buf.getvalue(), [200], format="png")
        out = Image.open(io.BytesIO(t.data)).convert("RGB")
        if not (out.size == (t.width, t.height) == (200, 100) and near(out.getpixel((3, 3)), RED)
                and near(out.getpixel((196, 3)), GREEN)):
            wrong.append((orientation, out.size, out.getpixel((3, 3))))
    assert not wrong, f"{fmt}: not upright for (orientation, size, top-left pixel) {wrong}"


def test_phone_mpo_photos_take_the_jpeg_fast_path(photo: bytes) -> None:
    """Many phones write MPO (a JPEG followed by more pictures: depth or gain maps), which Pillow names MPO, not
    JPEG. Its first picture must get the same DCT-scaled decode as a plain JPEG (a full decode was 3.4x the CPU
    for a 12 MP photo); the same bytes out prove the same path."""
    pixels = Image.open(io.BytesIO(photo)).reduce(2)  # 2000x1500: drafted at 1/4 for 256 px
    exif = Image.Exif()
    exif[0x0112] = 6
    encoded = {}
    for fmt in ("MPO", "JPEG"):  # the same pixels, encoder and quality: the same first picture
        buf = io.BytesIO()
        extra = {"save_all": True, "append_images": [Image.new("RGB", (400, 300))]} if fmt == "MPO" else {}
        pixels.save(buf, fmt, quality=85, exif=exif, **extra)
        encoded[fmt] = buf.getvalue()
    mpo = encoded["MPO"]
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert render(mpo, [256], format="png") == render(encoded["JPEG"], [256], format="png")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("dims", [(30000, 30000), (200_000, 200_000)])
def test_decompression_bomb_is_rejected_before_decoding(dims: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused from the header's dimensions: no pixel is decoded (which, at 30,000 x 30,000, would take gigabytes).
    Seen from the decoder, not from a clock."""
    from PIL import ImageFile

    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(self: Any) -> Any:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(thumb.ThumbnailError, match="decompression bomb"):
        render(_png_header_only(*dims), [256], max_pixels=50_000_000)
    assert loads == [], f"decoded {loads} before refusing it"


def test_truncated_and_garbage_inputs(photo: bytes) -> None:
    with pytest.raises(thumb.ThumbnailError, match="truncated"):
        render(photo[: len(photo) // 2], [256])
    with pytest.raises(thumb.ThumbnailError, match="not an image"):
        render(b"this is not an image at all", [256])


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nnewpath 0 0 moveto 100 100 lineto stroke\nshowpage\n"


def test_only_common_photo_formats_are_decoded() -> None:
    """Uploads are untrusted: an EPS is refused by name, never handed to Pillow's EPS plugin (which runs
    Ghostscript on it when Ghostscript is installed), and neither are the rarely used decoders."""
    with pytest.raises(thumb.ThumbnailError, match="EPS.*not one of the input formats"):
        render(EPS, [256])
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "PCX")
    with pytest.raises(thumb.ThumbnailError, match="PCX.*not one of the input formats"):
        render(buf.getvalue(), [256])
    (t,) = render(buf.getvalue(), [256], input_formats=("JPEG", "PCX"))  # the operator can widen the list
    assert (t.width, t.height) == (256, 171)


def _image(kind: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if kind == "png-rgba":
        im = Image.new("RGBA", (600, 300), (0, 0, 255, 0))
        im.paste((0, 255, 0, 255), (0, 0, 300, 300))
        im.save(buf, "PNG")
        return buf.getvalue(), "image/png"
    if kind == "png-p-transparency":
        im = Image.new("P", (300, 600), 0)
        im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
        im.paste(1, (0, 0, 300, 300))
        im.save(buf, "PNG", transparency=0)
        return buf.getvalue(), "image/png"
    if kind == "jpeg-cmyk":
        Image.new("CMYK", (800, 400), (0, 255, 255, 0)).save(buf, "JPEG")  # red in CMYK
        return buf.getvalue(), "image/jpeg"
    if kind == "gif":
        frames = [Image.new("P", (500, 500), i) for i in (1, 2)]
        for f in frames:
            f.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        return buf.getvalue(), "image/gif"
    if kind == "png-16bit":
        im = Image.linear_gradient("L").resize((512, 512)).convert("I")
        im = im.point(lambda v: v * 257).convert("I;16")
        im.save(buf, "PNG")
        return buf.getvalue(), "image/png"
    if kind == "tiff":
        Image.new("RGB", (400, 400), RED).save(buf, "TIFF")
        return buf.getvalue(), "image/tiff"
    if kind == "bmp":
        Image.new("RGB", (400, 400), RED).save(buf, "BMP")
        return buf.getvalue(), "image/bmp"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,check",
    [
        ("png-rgba", lambda im: im.mode == "RGBA" and im.getpixel((10, 10))[1] > 200
         and im.getpixel((250, 10))[3] == 0),
        ("png-p-transparency", lambda im: im.mode == "RGBA" and im.getpixel((5, 200))[3] == 0),
        ("jpeg-cmyk", lambda im: near(im.convert("RGB").getpixel((10, 10)), RED)),
        ("gif", lambda im: near(im.convert("RGB").getpixel((10, 10)), RED)),  # the first frame
        ("png-16bit", lambda im: im.convert("L").getpixel((5, 250)) > 200 and im.convert("L").getpixel((5, 5)) < 30),
        ("tiff", lambda im: near(im.convert("RGB").getpixel((10, 10)), RED)),
        ("bmp", lambda im: near(im.convert("RGB").getpixel((10, 10)), RED)),
    ],
)
def test_colour_modes(kind: str, check: Any) -> None:
    data, _ = _image(kind)
    (t,) = render(data, [256], format="webp")
    im = Image.open(io.BytesIO(t.data))
    assert max(t.width, t.height) == 256
    assert check(im), (kind, im.mode)


def test_alpha_flattened_for_jpeg_output() -> None:
    data, _ = _image("png-rgba")
    (t,) = render(data, [128], format="jpeg", background=(255, 255, 255))
    im = Image.open(io.BytesIO(t.data))
    assert im.mode == "RGB" and near(im.getpixel((120, 5)), (255, 255, 255))


# -- settings ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings,match",
    [
        ({"sizes": [0]}, "sizes"),
        ({"sizes": "big"}, "sizes"),
        ({"format": "gif"}, "format"),
        ({"quality": 0}, "quality"),
        ({"input_formats": ["jpeg", "svg"]}, "input_formats: 'svg' is not a format"),
        ({"input_formats": []}, "input_formats"),
        ({"key_template": "{size}/thumb.webp"}, "key_template"),
        ({"key_template": "{key}", "sizes": [64, 128]}, "key_template"),
        ({"key_template": "{key}"}, "key_template: .*over its source"),
        ({"key_template": "{stem}"}, "key_template: .*over its source"),
        ({"key_template": "../{size}/{key}"}, "key_template"),
        ({"key_template": "{nope}/{key}"}, "key_template"),
        ({"max_pixels": -1}, "max_pixels"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_settings_are_one_line_config_errors(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PluginHarness(thumb, settings=settings)


def test_defaults_are_filled_in() -> None:
    h = PluginHarness(thumb, settings={"sizes": [64, 512]})
    assert h.settings["sizes"] == [512, 64] and h.settings["format"] == "webp"
    assert h.settings["key_template"] == "{size}/{key}.{ext}" and h.settings["delete_with_source"] is True


def test_default_names_say_what_the_thumbnail_is(weed: Any, bucket: str) -> None:
    """`512/demo/sunset.jpg` holding WebP bytes misleads every tool that goes by the name: the default appends
    the output format's extension, and the thumbnails' own events are still never thumbnailed."""
    c = weed.client()
    data, _ = _image("png-rgba")
    ev = upload(c, bucket, "demo/sunset.jpg", data, "image/jpeg")
    webp = upload(c, bucket, "demo/already.webp", data, "image/webp")
    with harness(weed, sizes=[64, 512]) as h:
        published = h.handle(ev) + h.handle(webp)
        made = ["512/demo/sunset.jpg.webp", "64/demo/sunset.jpg.webp", "512/demo/already.webp.webp",
                "64/demo/already.webp.webp"]
        assert [p.data["key"] for p in published] == made
        for k in made:
            assert c.stat_object(bucket, k).content_type == "image/webp"
            # Its creation event, with and without the marker in the notification: not thumbnailed again.
            for md in ({"X-Amz-Meta-Bucketwire-Generated": "thumbnail"}, {}):
                assert h.handle(obj_event("ObjectCreated:Put", bucket, k, ctype="image/webp", md=md)) == []
    assert len(keys(c, bucket)) == 2 + len(made)


# -- against SeaweedFS ----------------------------------------------------------------------------------------
def test_12mp_upload_makes_thumbnails_once_and_never_of_its_output(weed: Any, bucket: str, photo: bytes,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    c = weed.client()
    ev = upload(c, bucket, "holiday/beach photo.jpg", photo, "image/jpeg")
    with harness(weed, sizes=[256, 1024], format="jpeg", quality=85) as h:
        published = h.handle(ev)
        assert keys(c, bucket) == ["1024/holiday/beach photo.jpg.jpg", "256/holiday/beach photo.jpg.jpg",
                                   "holiday/beach photo.jpg"]
        assert [p.topic for p in published] == ["thumbnail-ready", "thumbnail-ready"]
        by_size = {p.data["size"]: p.data for p in published}
        assert (by_size[256]["width"], by_size[256]["height"]) == (192, 256)
        assert (by_size[1024]["width"], by_size[1024]["height"]) == (768, 1024)
        assert by_size[256]["source_key"] == "holiday/beach photo.jpg" and by_size[256]["format"] == "jpeg"
        for size, (w, hgt) in {256: (192, 256), 1024: (768, 1024)}.items():
            key = f"{size}/holiday/beach photo.jpg.jpg"
            st = c.stat_object(bucket, key)
            assert st.content_type == "image/jpeg"
            md = {k.lower(): v for k, v in st.metadata.items()}
            assert md["x-amz-meta-bucketwire-generated"] == "thumbnail"
            assert md["x-amz-meta-bucketwire-source-etag"] == ev.data["etag"]
            assert md["x-amz-meta-bucketwire-source-bucket"] == bucket
            assert md["x-amz-meta-bucketwire-source-key"] == "holiday/beach%20photo.jpg"
            assert (md["x-amz-meta-bucketwire-width"], md["x-amz-meta-bucketwire-height"]) == (str(w), str(hgt))
            resp = c.get_object(bucket, key)
            im = Image.open(io.BytesIO(resp.read())).convert("RGB")
            resp.close()
            resp.release_conn()
            assert im.size == (w, hgt) and near(im.getpixel((w - 3, 3)), RED)

        # The thumbnails' own creation events (same bucket as the source): no thumbnail of a thumbnail,
        # whether the notifier carried the user metadata or not.
        for key in ("256/holiday/beach photo.jpg.jpg", "1024/holiday/beach photo.jpg.jpg"):
            st = c.stat_object(bucket, key)
            for md in ({"X-Amz-Meta-Bucketwire-Generated": "thumbnail"}, {}):
                e = obj_event("ObjectCreated:Put", bucket, key, size=st.size, etag=st.etag,
                              ctype="image/jpeg", md=md)
                assert h.handle(e) == []
        assert len(keys(c, bucket)) == 3

        # Redelivery: nothing decoded or written; the same follow-ons (same ids, so the hub drops them).
        before = {k: c.stat_object(bucket, k).last_modified for k in keys(c, bucket)}

        def boom(*a: Any, **k: Any) -> Any:
            raise AssertionError("a redelivery must not decode again")

        monkeypatch.setattr(thumb, "render", boom)
        again = h.handle(ev)
        assert [p.id for p in again] == [p.id for p in published]
        assert [p.data for p in again] == [p.data for p in published]
        assert {k: c.stat_object(bucket, k).last_modified for k in keys(c, bucket)} == before
        monkeypatch.undo()

        # A removal whose source still exists (versioned delete, re-upload) keeps the thumbnails ...
        rm = obj_event("ObjectRemoved:Delete", bucket, "holiday/beach photo.jpg")
        h.handle(rm)
        assert len(keys(c, bucket)) == 3
        # ... a real removal takes them away.
        c.remove_object(bucket, "holiday/beach photo.jpg")
        assert h.handle(rm) == []
        assert keys(c, bucket) == []
        h.handle(rm)  # redelivered delete: harmless


def test_removal_in_one_bucket_keeps_the_thumbnail_of_another(weed: Any, bucket: str) -> None:
    """Two source buckets sharing an output bucket: deleting a.jpg in one must not remove the thumbnail that
    a.jpg of the other bucket owns (the thumbnail names its source bucket; only the key was compared)."""
    c = weed.client()
    other, out = f"{bucket}-b", f"{bucket}-out"
    c.make_bucket(other)
    c.make_bucket(out)
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(buf, "PNG")
    with harness(weed, sizes=[64], output_bucket=out) as h:
        h.handle(upload(c, bucket, "a.png", buf.getvalue(), "image/png"))
        h.handle(obj_event("ObjectRemoved:Delete", other, "a.png"))  # never existed in `other`
        assert keys(c, out) == ["64/a.png.webp"]
        c.remove_object(bucket, "a.png")
        h.handle(obj_event("ObjectRemoved:Delete", bucket, "a.png"))
        assert keys(c, out) == []


def test_buckets_sharing_output_bucket_never_overwrite_each_others_thumbnails(weed: Any, bucket: str) -> None:
    """Two source buckets, one output_bucket, a key_template without {bucket}: a.png of the second bucket must
    not replace the thumbnail of the first's a.png (that served one bucket's picture as the other's); it is
    refused with one line saying to add {bucket}. With {bucket} in the template both get their own."""
    c = weed.client()
    other, out = f"{bucket}-b", f"{bucket}-out"
    c.make_bucket(other)
    c.make_bucket(out)
    red, blue = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(red, "PNG")
    Image.new("RGB", (300, 200), (0, 0, 255)).save(blue, "PNG")
    with harness(weed, sizes=[64], output_bucket=out) as h:
        h.handle(upload(c, bucket, "a.png", red.getvalue(), "image/png"))
        with pytest.raises(PermanentError, match=r"thumbnail of .*/a\.png; source buckets share output_bucket, "
                                                 r"so put \{bucket\} in key_template"):
            h.handle(upload(c, other, "a.png", blue.getvalue(), "image/png"))
    thumb_img = Image.open(io.BytesIO(c.get_object(out, "64/a.png.webp").read())).convert("RGB")
    assert thumb_img.getpixel((0, 0))[0] > 200  # still the first bucket's red picture
    with harness(weed, sizes=[64], output_bucket=out, key_template="{size}/{bucket}/{key}.{ext}") as h:
        h.handle(upload(c, bucket, "a.png", red.getvalue(), "image/png"))
        h.handle(upload(c, other, "a.png", blue.getvalue(), "image/png"))
    assert {f"64/{bucket}/a.png.webp", f"64/{other}/a.png.webp"} <= set(keys(c, out))

def test_a_tag_change_does_not_announce_the_thumbnails_again(weed: Any, bucket: str) -> None:
    """MinIO sends s3:ObjectCreated:PutTagging (PutRetention, PutLegalHold) for an object whose bytes did not
    change: its thumbnails exist and stay, and no thumbnail-ready goes out again (with the tag event's new ids,
    every consumer did its work once more per tag change). A redelivery of the event that made them still
    announces them again, with the same ids."""
    c = weed.client()
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(buf, "PNG")
    with harness(weed, sizes=[64], topic="thumbnail-ready") as h:
        made = upload(c, bucket, "t.png", buf.getvalue(), "image/png")
        first = h.handle(made)
        assert [p.topic for p in first] == ["thumbnail-ready"]
        tagged = obj_event("ObjectCreated:PutTagging", bucket, "t.png", size=made.data["size"],
                           etag=made.data["etag"], ctype="image/png")
        assert h.handle(tagged) == []
        assert [p.id for p in h.handle(made)] == [p.id for p in first]
    assert keys(c, bucket) == ["64/t.png.webp", "t.png"]

def test_a_lifecycle_expiration_removes_the_thumbnails(weed: Any, bucket: str) -> None:
    """An object a lifecycle rule expired is gone like a deleted one (AWS sends `s3:LifecycleExpiration:Delete`
    and `...:DeleteMarkerCreated` for them): its thumbnails go too. They were taken for neither a creation nor a
    removal, so every expired photo left its thumbnails behind for good."""
    c = weed.client()
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(buf, "PNG")
    with harness(weed, sizes=[64]) as h:
        h.handle(upload(c, bucket, "old.png", buf.getvalue(), "image/png"))
        assert keys(c, bucket) == ["64/old.png.webp", "old.png"]
        c.remove_object(bucket, "old.png")
        h.handle(obj_event("LifecycleExpiration:Delete", bucket, "old.png"))
        assert keys(c, bucket) == []


def test_marker_in_object_metadata_stops_recursion(weed: Any, bucket: str) -> None:
    """Even when the key is outside the output pattern and the event carries no metadata."""
    c = weed.client()
    data, _ = _image("bmp")
    ev = upload(c, bucket, "elsewhere/copied-thumb.bmp", data, "image/bmp",
                md={"bucketwire-generated": "thumbnail"})
    with harness(weed, sizes=[64]) as h:
        assert h.handle(ev) == []
        # A follow-on many hops deep is dropped by the hop limit.
        ev2 = upload(c, bucket, "deep.bmp", data, "image/bmp", hops=9)
        assert h.handle(ev2) == []
    assert keys(c, bucket) == ["deep.bmp", "elsewhere/copied-thumb.bmp"]


@pytest.mark.parametrize("kind", ["png-rgba", "jpeg-cmyk", "gif", "png-16bit"])
def test_formats_through_the_store_to_another_bucket(weed: Any, bucket: str, kind: str) -> None:
    c = weed.client()
    out = bucket + "-thumbs"
    c.make_bucket(out)
    data, ctype = _image(kind)
    ev = upload(c, bucket, f"in/{kind}", data, ctype)
    with harness(weed, sizes=[128], output_bucket=out, key_template="t/{size}/{stem}.{ext}") as h:
        (p,) = h.handle(ev)
    assert keys(c, out) == [f"t/128/in/{kind}.webp"]
    assert p.data["bucket"] == out and p.data["content_type"] == "image/webp"
    resp = c.get_object(out, f"t/128/in/{kind}.webp")
    im = Image.open(io.BytesIO(resp.read()))
    resp.close()
    resp.release_conn()
    assert max(im.size) == 128 and im.format == "WEBP"


def test_octet_stream_sniffed_and_non_images_ignored(weed: Any, bucket: str) -> None:
    c = weed.client()
    data, _ = _image("bmp")
    with harness(weed, sizes=[32]) as h:
        assert len(h.handle(upload(c, bucket, "noext", data, "application/octet-stream"))) == 1
        assert h.handle(upload(c, bucket, "notes.txt", b"hello", "text/plain")) == []
        assert h.handle(upload(c, bucket, "blob.bin", b"\0" * 100, "application/octet-stream")) == []
    assert keys(c, bucket) == ["32/noext.webp", "blob.bin", "noext", "notes.txt"]


def test_bomb_truncated_and_oversized_uploads_are_permanent_errors(weed: Any, bucket: str, photo: bytes) -> None:
    c = weed.client()
    with harness(weed, sizes=[256], max_pixels=40_000_000, max_bytes=len(photo)) as h:
        with pytest.raises(PermanentError, match=r"bomb\.png: .*decompression bomb") as ei:
            h.handle(upload(c, bucket, "bomb.png", _png_header_only(40000, 40000), "image/png"))
        assert "max_pixels=40000000" in str(ei.value) and "\n" not in str(ei.value)
        with pytest.raises(PermanentError, match=r"half\.jpg: cannot decode image \(JPEG\): .*truncated"):
            h.handle(upload(c, bucket, "half.jpg", photo[: len(photo) // 2], "image/jpeg"))
        with pytest.raises(PermanentError, match="over max_bytes"):
            h.handle(upload(c, bucket, "big.jpg", photo + b"\0" * 10, "image/jpeg"))
        with pytest.raises(PermanentError, match="segments"):
            h.handle(obj_event("ObjectCreated:Put", bucket, "a/../../b.jpg", ctype="image/jpeg"))
        with pytest.raises(PermanentError, match=r"cover\.jpg: EPS image: not one of the input formats"):
            h.handle(upload(c, bucket, "cover.jpg", EPS, "image/jpeg"))
    assert isinstance(ei.value, bucketwire.PluginError)


def test_source_gone_before_handling_is_quiet(weed: Any, bucket: str) -> None:
    with harness(weed, sizes=[64]) as h:
        assert h.handle(obj_event("ObjectCreated:Put", bucket, "vanished.jpg", etag="abc", ctype="image/jpeg")) == []
    with pytest.raises(S3Error):
        weed.client().stat_object(bucket, "64/vanished.jpg.webp")


def _plugin_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bucketwire.plugin.thumbnail" and r.levelno == level]


@pytest.mark.parametrize("ctype", ["", "application/octet-stream", "image/jpeg"])
def test_empty_object_is_skipped_not_an_error(weed: Any, bucket: str, ctype: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A 0-byte object (a `touch`, a folder marker, an upload with no body) answers the 16-byte sniff with 416."""
    c = weed.client()
    c.put_object(bucket, "empty", io.BytesIO(b""), 0)
    st = c.stat_object(bucket, "empty")
    ev = obj_event("ObjectCreated:Put", bucket, "empty", size=0, etag=st.etag, ctype=ctype)
    caplog.set_level(logging.DEBUG, logger="bucketwire.plugin.thumbnail")
    with harness(weed, sizes=[64]) as h:
        assert h.handle(ev) == []
    assert keys(c, bucket) == ["empty"]
    assert _plugin_lines(caplog, logging.INFO) == [] and _plugin_lines(caplog, logging.WARNING) == []


@pytest.mark.parametrize("ctype", ["image/jpeg", "application/octet-stream"])
def test_object_deleted_before_handling_is_one_info_line(weed: Any, bucket: str, ctype: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    c = weed.client()
    data, _ = _image("bmp")
    ev = upload(c, bucket, "gone/soon.bmp", data, ctype)
    c.remove_object(bucket, "gone/soon.bmp")
    caplog.set_level(logging.INFO, logger="bucketwire.plugin.thumbnail")
    with harness(weed, sizes=[64]) as h:
        assert h.handle(ev) == []
    assert keys(c, bucket) == []
    (line,) = _plugin_lines(caplog, logging.INFO)
    assert "gone/soon.bmp" in line and "deleted" in line


@pytest.mark.parametrize("replacement", ["text", "octet-text", "empty", "truncated", "too-big"])
def test_a_photo_overwritten_by_what_makes_no_thumbnail_loses_its_thumbnails(weed: Any, bucket: str,
                                                                              replacement: str) -> None:
    """A photo replaced by a document, an empty object, a broken image or one over max_bytes: its thumbnails
    showed the old photo under the key for good (the new object's event made none, and no removal event
    comes). They go with it, as with a delete; another key's thumbnails, and those of the current bytes, stay."""
    c = weed.client()
    out = f"{bucket}-out"
    c.make_bucket(out)
    red = io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(red, "PNG")
    body, ctype = {
        "text": (b"quarterly figures", "text/plain"),
        "octet-text": (b"quarterly figures", "application/octet-stream"),
        "empty": (b"", "image/png"),
        "truncated": (red.getvalue()[:60], "image/png"),
        "too-big": (b"\x89PNG\r\n\x1a\n" + b"\0" * 6000, "image/png"),
    }[replacement]
    tpl = "{size}/{bucket}/{key}.{ext}"
    with harness(weed, sizes=[64, 32], output_bucket=out, key_template=tpl, max_bytes=5000) as h:
        h.handle(upload(c, bucket, "a.png", red.getvalue(), "image/png"))
        h.handle(upload(c, bucket, "b.png", red.getvalue(), "image/png"))
        assert keys(c, out) == sorted(f"{s}/{bucket}/{k}.webp" for s in (32, 64) for k in ("a.png", "b.png"))
        replaced = upload(c, bucket, "a.png", body, ctype)
        if replacement in ("truncated", "too-big"):
            with pytest.raises(PermanentError):
                h.handle(replaced)
        else:
            assert h.handle(replaced) == []
        assert keys(c, out) == [f"32/{bucket}/b.png.webp", f"64/{bucket}/b.png.webp"]
        # The photo back: its thumbnails again; the replacement's event redelivered late leaves them alone.
        h.handle(upload(c, bucket, "a.png", red.getvalue(), "image/png"))
        try:
            h.handle(replaced)
        except PermanentError:
            pass
        assert len(keys(c, out)) == 4
    with harness(weed, sizes=[64, 32], output_bucket=out, key_template=tpl, max_bytes=5000,
                 delete_with_source=False) as h:
        replaced = upload(c, bucket, "a.png", body, ctype)
        try:
            h.handle(replaced)
        except PermanentError:
            pass
        assert len(keys(c, out)) == 4  # delete_with_source = false keeps them, as it keeps a deleted one's


def test_a_thumbnail_never_replaces_an_object_it_did_not_make(weed: Any, bucket: str) -> None:
    """A thumbnail key that names someone's own object (`{stem}.{ext}` in the source bucket: photo.png's JPEG
    thumbnail is photo.jpg; a user's file under the output prefix) overwrote it: the user's photo.jpg was gone,
    a 256 px copy of another picture in its place. Refused with one line; the plugin's own thumbnails are still
    replaced (redeliveries, new bytes). A key_template that is only {key} or {stem} with no output_bucket puts
    each thumbnail over its source: refused at start (test_bad_settings_are_one_line_config_errors)."""
    c = weed.client()
    blue, red = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (300, 200), (0, 0, 255)).save(blue, "JPEG")
    Image.new("RGB", (300, 200), RED).save(red, "PNG")
    upload(c, bucket, "photo.jpg", blue.getvalue(), "image/jpeg")
    with harness(weed, sizes=[64], key_template="{stem}.{ext}", format="jpeg") as h:
        ev = upload(c, bucket, "photo.png", red.getvalue(), "image/png")
        with pytest.raises(PermanentError, match=r"photo\.png: .*/photo\.jpg exists and is not a thumbnail"):
            h.handle(ev)
        assert c.get_object(bucket, "photo.jpg").read() == blue.getvalue()
        c.remove_object(bucket, "photo.jpg")
        (p,) = h.handle(ev)
        assert p.data["key"] == "photo.jpg" and thumb.is_generated(c.stat_object(bucket, "photo.jpg").metadata)
        ev2 = upload(c, bucket, "photo.png", blue.getvalue(), "image/png")  # new bytes: its thumbnail replaced
        (p2,) = h.handle(ev2)
        assert p2.data["source_etag"] == ev2.data["etag"]
    out = f"{bucket}-out"
    c.make_bucket(out)
    upload(c, out, "64/photo.png.webp", blue.getvalue(), "image/webp")  # the user's own file there
    with harness(weed, sizes=[64], output_bucket=out) as h, pytest.raises(PermanentError, match="not a thumbnail"):
        h.handle(ev2)
    assert c.get_object(out, "64/photo.png.webp").read() == blue.getvalue()


def test_a_removal_that_leaves_the_object_in_place_makes_its_thumbnails_current(weed: Any, bucket: str) -> None:
    """Versioned buckets: deleting the current version makes the one before it current, and removing a delete
    marker brings the object back; both are removal events, and no creation event follows. The thumbnails kept
    showing the deleted version (blue for a red photo), or stayed gone for an object that is there."""
    from minio.versioningconfig import ENABLED, VersioningConfig

    c = weed.client()
    c.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
    red, blue = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(red, "PNG")
    Image.new("RGB", (300, 200), (0, 0, 255)).save(blue, "PNG")

    def shown() -> tuple[int, ...]:
        return tuple(Image.open(io.BytesIO(c.get_object(bucket, "64/v.png.webp").read())).convert("RGB")
                     .getpixel((5, 5)))

    with harness(weed, sizes=[64]) as h:
        first = upload(c, bucket, "v.png", red.getvalue(), "image/png")
        h.handle(first)
        h.handle(upload(c, bucket, "v.png", blue.getvalue(), "image/png"))
        assert near(shown(), (0, 0, 255))
        c.remove_object(bucket, "v.png", version_id=c.stat_object(bucket, "v.png").version_id)
        h.handle(obj_event("ObjectRemoved:Delete", bucket, "v.png"))
        assert near(shown(), RED)
        assert thumb.meta_get(c.stat_object(bucket, "64/v.png.webp").metadata,
                              "bucketwire-source-etag") == first.data["etag"]
        c.remove_object(bucket, "v.png")  # a delete marker: the thumbnails go
        h.handle(obj_event("ObjectRemoved:DeleteMarkerCreated", bucket, "v.png"))
        assert keys(c, bucket) == []
        marker = [o for o in c.list_objects(bucket, prefix="v.png", include_version=True) if o.is_delete_marker]
        c.remove_object(bucket, "v.png", version_id=marker[0].version_id)  # ... removed: the photo is back
        h.handle(obj_event("ObjectRemoved:Delete", bucket, "v.png"))
        assert keys(c, bucket) == ["64/v.png.webp", "v.png"] and near(shown(), RED)


def test_a_copied_thumbnail_in_the_source_bucket_is_replaced_not_refused(weed: Any, bucket: str) -> None:
    """Two buckets replicating into each other, thumbnails made in each: bucket B holds the replica of A's photo
    and of A's thumbnail (generated, naming bucket A) before B's own event for the photo is handled. That copy is
    replaced by B's thumbnail; the 'another bucket owns it' refusal is for a shared output_bucket only."""
    import bucketwire_replication as repl

    c = weed.client()
    other = f"{bucket}-b"
    c.make_bucket(other)
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), RED).save(buf, "PNG")
    stores = {"primary": StoreConfig(name="primary", endpoint=weed.s3_endpoint, access_key=weed.access_key,
                                     secret_key=weed.secret_key)}
    with harness(weed, sizes=[64]) as h, PluginHarness(repl, settings={
            "target_store": "primary", "target_bucket": other, "buckets": [bucket]}, stores=stores) as r:
        ev = upload(c, bucket, "x.png", buf.getvalue(), "image/png")
        h.handle(ev)
        r.handle(ev)
        st = c.stat_object(bucket, "64/x.png.webp")
        r.handle(obj_event("ObjectCreated:Put", bucket, "64/x.png.webp", etag=st.etag, ctype="image/webp"))
        assert thumb.meta_get(c.stat_object(other, "64/x.png.webp").metadata, "bucketwire-source-bucket") == bucket
        st = c.stat_object(other, "x.png")
        (p,) = h.handle(obj_event("ObjectCreated:Put", other, "x.png", etag=st.etag, ctype="image/png"))
        assert p.data["bucket"] == other
        assert thumb.meta_get(c.stat_object(other, "64/x.png.webp").metadata, "bucketwire-source-bucket") == other
