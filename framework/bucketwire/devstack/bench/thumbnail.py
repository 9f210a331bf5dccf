"""`bucketwire bench thumbnail`: thumbnails/s of the thumbnail plugin's render path against plain Pillow.

Subject: `bucketwire_thumbnail.imaging.render`, exactly what the plugin calls per event (no S3 around it), with
the plugin's default format and quality. Baseline: what anyone would write with Pillow alone: `Image.open`,
`convert("RGB")`, `resize` with LANCZOS to the same size, `save` in the same format and quality. Both run in
this process, interleaved iteration by iteration so a noisy neighbour slows both alike.

The source is a 12 MP JPEG generated once per run with photo-like content (smooth gradients, texture at several
scales, hard edges, sensor noise) because the decoder's cost depends on the content: a flat test card decodes
several times faster than a photo, which would flatter any decoder trick. Quality is reported too, as the PSNR
of the plugin's thumbnail against the baseline's (full decode + LANCZOS) at the same size.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any

import PIL
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

from bucketwire.devstack.bench.common import percentiles, progress, progress_done


def photo(width: int = 4000, height: int = 3000, quality: int = 90, grain: float = 3, texture: float = 30) -> bytes:
    """A JPEG with photo-like content: what a camera upload costs to decode, not what a test card costs.

    The defaults give about 2.1 bits per pixel (3.2 MB at 12 MP), in the range of 12 MP phone JPEGs
    (2-4 MB). The entropy decode that no DCT-scaling trick avoids grows with the bits per pixel, so more
    `grain` (sensor noise) means a smaller ratio; the JSON reports the bits per pixel next to it.
    """
    size = (width, height)
    # Low-frequency "scene": blurred large-scale noise per channel over a sky-to-ground gradient.
    chans = []
    for k, sigma in enumerate((70, 55, 40)):
        coarse = Image.effect_noise((max(1, width // 64), max(1, height // 64)), sigma)
        coarse = coarse.resize(size, Image.Resampling.BICUBIC)
        grad = Image.linear_gradient("L").resize(size).rotate(180 * (k % 2))
        chans.append(ImageChops.blend(coarse, grad, 0.4))
    im = Image.merge("RGB", chans)
    # Mid-frequency texture (foliage, fabric) and hard edges (buildings, text).
    tex = Image.effect_noise((max(1, width // 4), max(1, height // 4)), texture).resize(size, Image.Resampling.BILINEAR)
    im = ImageChops.add(im, Image.merge("RGB", (tex, tex, tex)), scale=1.25, offset=-40)
    draw = ImageDraw.Draw(im)
    step = max(8, min(width, height) // 12)
    for i in range(0, width, step):
        for j in range(0, height, step * 2):
            if (i // step + j // step) % 5 == 0:
                c = ((i * 7) % 256, (j * 3) % 256, ((i + j) * 5) % 256)
                draw.rectangle((i, j, i + step // 2, j + step // 3), fill=c, outline=(0, 0, 0), width=3)
    im = im.filter(ImageFilter.GaussianBlur(0.6))
    # Sensor noise at pixel level: what makes photos expensive for the entropy decoder.
    noise = Image.effect_noise(size, grain)
    im = ImageChops.add(im, Image.merge("RGB", (noise, noise, noise)), scale=1.0, offset=-128)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def plain_pillow(data: bytes, size: tuple[int, int], pil_format: str, quality: int) -> bytes:
    """The baseline: the straightforward Pillow thumbnail, full decode and all."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, pil_format, quality=quality)
    return buf.getvalue()


def psnr(encoded: bytes, reference: Image.Image) -> float:
    """PSNR in dB of an encoded thumbnail against the ideal one (full decode + LANCZOS, never encoded)."""
    im = Image.open(io.BytesIO(encoded)).convert("RGB")
    if im.size != reference.size:
        return 0.0
    rms = ImageStat.Stat(ImageChops.difference(im, reference)).rms
    mse = sum(v * v for v in rms) / len(rms)
    return 99.0 if mse == 0 else round(10 * math.log10(255 * 255 / mse), 2)


def run(width: int, height: int, sizes: list[int], iterations: int, fmt: str | None,
        quality: int | None, grain: float = 3) -> dict[str, Any]:
    from bucketwire.devstack.bench.bus import machine
    from bucketwire_thumbnail import DEFAULTS
    from bucketwire_thumbnail.imaging import FORMATS, fit, render

    fmt = (fmt or DEFAULTS["format"]).lower()
    quality = quality or DEFAULTS["quality"]
    pil_format = FORMATS[fmt][0]
    progress(f"bench thumbnail: generating a {width}x{height} photo-like JPEG")
    src = photo(width, height, grain=grain)
    full = Image.open(io.BytesIO(src)).convert("RGB")
    out: dict[str, Any] = {
        "benchmark": "thumbnail", "machine": machine(), "pillow": PIL.__version__,
        "source": {"width": width, "height": height, "bytes": len(src), "format": "JPEG", "grain": grain,
                   "bits_per_pixel": round(len(src) * 8 / (width * height), 2)},
        "format": fmt, "quality": quality, "iterations": iterations, "sizes": [],
    }
    for size in sizes:
        target = fit(width, height, size)
        # One untimed round each: first-call costs (imports, encoder set-up) are not what we measure.
        (ours,) = render(src, [size], format=fmt, quality=quality)
        theirs = plain_pillow(src, target, pil_format, quality)
        ideal = full.resize(target, Image.Resampling.LANCZOS)
        t_sub: list[float] = []
        t_base: list[float] = []
        for i in range(iterations):
            progress(f"bench thumbnail: {size} px, iteration {i + 1}/{iterations}")
            t0 = time.perf_counter()
            render(src, [size], format=fmt, quality=quality)
            t1 = time.perf_counter()
            plain_pillow(src, target, pil_format, quality)
            t2 = time.perf_counter()
            t_sub.append(t1 - t0)
            t_base.append(t2 - t1)
        sub_tps, base_tps = len(t_sub) / sum(t_sub), len(t_base) / sum(t_base)
        out["sizes"].append({
            "size": size,
            "output": {"width": ours.width, "height": ours.height},
            "subject": {"name": "bucketwire_thumbnail.imaging.render", "thumbnails": len(t_sub),
                        "thumbnails_per_s": round(sub_tps, 2), "bytes": len(ours.data),
                        "psnr_db": psnr(ours.data, ideal), "latency": percentiles(t_sub)},
            "baseline": {"name": "Pillow open/convert RGB/resize LANCZOS/save", "thumbnails": len(t_base),
                         "thumbnails_per_s": round(base_tps, 2), "bytes": len(theirs),
                         "output": {"width": target[0], "height": target[1]},
                         "psnr_db": psnr(theirs, ideal), "latency": percentiles(t_base)},
            "ratio": round(sub_tps / base_tps, 2),
        })
    progress_done()
    return out


def render_text(res: dict[str, Any]) -> str:
    s = res["source"]
    lines = [f"source: {s['width']}x{s['height']} JPEG, {s['bytes']:,} bytes ({s['bits_per_pixel']} bits/pixel); "
             f"output {res['format']} quality {res['quality']}; {res['iterations']} iterations each, interleaved;"
             " PSNR against full decode + LANCZOS before encoding"]
    for r in res["sizes"]:
        a, b = r["subject"], r["baseline"]
        lines.append(f"{r['size']} px ({r['output']['width']}x{r['output']['height']}):")
        for label, x in (("bucketwire render:", a), ("plain Pillow:", b)):
            lat = x["latency"]
            lines.append(f"  {label:19} {x['thumbnails_per_s']:8.2f} thumbnails/s  p50 {lat['p50_ms']} ms"
                         f"  p90 {lat['p90_ms']}  max {lat['max_ms']}  {x['bytes']:,} bytes  {x['psnr_db']} dB")
        lines.append(f"  ratio {r['ratio']}x of plain Pillow")
    return "\n".join(lines)
