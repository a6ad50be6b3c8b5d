"""Image preprocessing: a small spec (options or TOML) and the loader that applies it.

Steps, in order: decode (RGB, or L for one-channel inputs); resize (the shorter
side to ``resize``, or straight to ``size`` when ``mode = "stretch"``); centre
crop to ``size``; multiply by ``scale``; subtract ``mean`` and divide by ``std``
per channel; reverse the channels for ``bgr``; lay out as NCHW or NHWC with a
batch axis of 1.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from dscompile.calibration.feeds import InputSpec
from dscompile.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
LAYOUTS = ("NCHW", "NHWC")
MODES = ("crop", "stretch")


@dataclass(frozen=True)
class Preprocess:
    """Every field None means "not given": the model's input or a default decides."""

    size: tuple[int, int] | None = None  # final (height, width)
    resize: int | None = None  # shorter side before the centre crop (default: max(size))
    mode: str | None = None  # crop | stretch
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None  # applied first: 1/255 maps 8-bit pixels to [0, 1]
    layout: str | None = None  # NCHW | NHWC
    bgr: bool | None = None

    def merged(self, over: Preprocess) -> Preprocess:
        """This spec with every field ``over`` sets replaced (options override the file)."""
        return replace(self, **{f.name: getattr(over, f.name) for f in fields(over) if getattr(over, f.name) is not None})

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ImagePlan:
    """A Preprocess resolved against one model input: nothing left unknown."""

    input: str
    dtype: str
    size: tuple[int, int]
    resize: int
    mode: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    layout: str
    bgr: bool

    def fingerprint(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def parse_size(text: str | int | list | tuple, what: str = "--image-size") -> tuple[int, int]:
    """224 -> (224, 224); "224x160" or [224, 160] -> (224, 160)."""
    try:
        if isinstance(text, int):
            parts = [text]
        elif isinstance(text, (list, tuple)):
            parts = [int(v) for v in text]
        else:
            parts = [int(v) for v in str(text).lower().replace(",", "x").split("x")]
    except (TypeError, ValueError):
        raise InputError(f"{what} {text!r}: expected N or HxW, e.g. 224 or 224x160") from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise InputError(f"{what} {text!r}: expected N or HxW with positive sizes, e.g. 224 or 224x160")
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def parse_floats(text: str | list, what: str) -> tuple[float, ...]:
    try:
        values = [float(v) for v in (text if isinstance(text, list) else str(text).split(","))]
    except (TypeError, ValueError):
        raise InputError(f"{what} {text!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if not values:
        raise InputError(f"{what}: no values")
    return tuple(values)


def load_preprocess(path: str | Path) -> Preprocess:
    """A TOML file with any of: size, resize, mode, mean, std, scale, layout, bgr."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such preprocessing spec") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    data = data.get("preprocess", data)
    known = {f.name for f in fields(Preprocess)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{path}: unknown preprocessing keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return make_preprocess(
        size=data.get("size"), resize=data.get("resize"), mode=data.get("mode"), mean=data.get("mean"),
        std=data.get("std"), scale=data.get("scale"), layout=data.get("layout"), bgr=data.get("bgr"), origin=str(path),
    )


def make_preprocess(*, size: Any = None, resize: Any = None, mode: str | None = None, mean: Any = None,
                    std: Any = None, scale: Any = None, layout: str | None = None, bgr: bool | None = None,
                    origin: str = "") -> Preprocess:
    """A checked Preprocess; ``origin`` names the TOML file in errors (empty: command-line options)."""

    def name(key: str) -> str:
        return f"{origin}: {key}" if origin else "--" + {"size": "image-size"}.get(key, key)

    if layout is not None and str(layout).upper() not in LAYOUTS:
        raise InputError(f"{name('layout')} {layout!r} is not one of {', '.join(LAYOUTS)}")
    if mode is not None and mode not in MODES:
        raise InputError(f"{name('mode')} {mode!r} is not one of {', '.join(MODES)}")
    std_t = parse_floats(std, name("std")) if std is not None else None
    if std_t and any(v == 0 for v in std_t):
        raise InputError(f"{name('std')} must not contain 0")
    try:
        scale_f = float(scale) if scale is not None else None
        resize_i = int(resize) if resize is not None else None
    except (TypeError, ValueError):
        raise InputError(f"{name('scale')} must be a number and {name('resize')} an integer") from None
    return Preprocess(
        size=parse_size(size, name("size")) if size is not None else None,
        resize=resize_i, mode=mode,
        mean=parse_floats(mean, name("mean")) if mean is not None else None,
        std=std_t, scale=scale_f, layout=str(layout).upper() if layout is not None else None,
        bgr=bool(bgr) if bgr is not None else None,
    )


def image_input(specs: tuple[InputSpec, ...]) -> InputSpec:
    if len(specs) != 1 or len(specs[0].shape) != 4:
        shown = ", ".join(f"{s.name} {list(s.shape)}" for s in specs)
        raise InputError(f"image folders need a model with one 4-D image input; this one has: {shown}")
    return specs[0]


def resolve(pre: Preprocess, spec: InputSpec) -> ImagePlan:
    """Fill what the spec left open from the model input (layout, size, channels) and defaults."""
    shape = spec.shape
    layout = pre.layout or ("NHWC" if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4) else "NCHW")
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    size = pre.size
    if size is None:
        if not (isinstance(h, int) and isinstance(w, int)):
            raise InputError(f"input {spec.name} has no fixed image size ({list(shape)}): give --image-size")
        size = (h, w)
    elif isinstance(h, int) and isinstance(w, int) and (h, w) != size:
        raise InputError(f"--image-size {size[0]}x{size[1]} does not match input {spec.name} {list(shape)}")
    channels = c if isinstance(c, int) else 3
    if channels not in (1, 3):
        raise InputError(f"input {spec.name} has {channels} channels; images give 1 (grey) or 3 (RGB)")
    mean = pre.mean or (0.0,) * channels
    std = pre.std or (1.0,) * channels
    for what, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, channels):
            raise InputError(f"--{what} has {len(v)} values; input {spec.name} has {channels} channels")
    integer = np.dtype(spec.dtype).kind in "iu"
    return ImagePlan(
        spec.name, spec.dtype, size, pre.resize or max(size), pre.mode or "crop", channels,
        tuple(mean) * (channels // len(mean)), tuple(std) * (channels // len(std)),
        pre.scale if pre.scale is not None else (1.0 if integer else 1.0 / 255.0), layout, bool(pre.bgr),
    )


def check_image(data: bytes, label: str) -> None:
    """Fail now on a file that is not a readable image (header and, where the format has them, checksums),
    rather than part-way through calibration when it is decoded."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except UnidentifiedImageError:
        raise InputError(f"{label}: cannot read the image (not an image format Pillow knows)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{label}: cannot read the image ({type(exc).__name__}: {exc})") from None


def load_image(path: Path, plan: ImagePlan, label: str) -> dict[str, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if plan.channels == 1 else "RGB")
            im = _resize(im, plan)
            pixels = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{label}: cannot read the image ({type(exc).__name__}: {exc})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    x = pixels * np.float32(plan.scale)
    x = (x - np.asarray(plan.mean, np.float32)) / np.asarray(plan.std, np.float32)
    if plan.bgr:
        x = x[:, :, ::-1]
    x = x.transpose(2, 0, 1) if plan.layout == "NCHW" else x
    return {plan.input: np.ascontiguousarray(x[None]).astype(plan.dtype)}


def _resize(im: Any, plan: ImagePlan) -> Any:
    from PIL import Image

    h, w = plan.size
    if plan.mode == "stretch":
        return im.resize((w, h), Image.BILINEAR)
    short = plan.resize
    iw, ih = im.size
    ratio = short / min(iw, ih)
    nw, nh = max(w, round(iw * ratio)), max(h, round(ih * ratio))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return im.crop((left, top, left + w, top + h))
