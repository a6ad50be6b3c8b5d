"""Calibration data sources: what ``--data`` / ``--calib`` point at.

- a folder of ``.npz`` files, one feed per file (keys = input names; shapes may
  differ between files: variable lengths, batch 1 or more);
- one ``.npy`` or ``.npz`` holding a stacked batch (rows along axis 0);
- a folder of images (jpg/png/bmp, recursive) with a preprocessing spec;
- ``module:function`` returning an iterable of feeds (runs user code: only with
  ``trust_code``).

A sample is one file, one image, one array row or one generator item. Files are
taken in sorted order; ``max_samples`` picks a seeded subset, kept in that order.
Every source is read once up front to check it (keys, rank, dtype, NaN/Inf) and
to hash it, so bad data fails before any compute. ``.npy``/``.npz`` are always
loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dscompile.calibration.feeds import (
    Feed,
    InputSpec,
    as_specs,
    batches,
    check_feed,
    digest_feed,
    rows_of,
)
from dscompile.calibration.images import (
    IMAGE_SUFFIXES,
    Preprocess,
    check_image,
    image_input,
    load_image,
    load_preprocess,
    resolve,
)
from dscompile.errors import InputError
from dscompile.usercode import import_callable

DATA_FORMAT = "dscompile-data/1"
_GENERATOR = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class DataOptions:
    max_samples: int | None = None
    seed: int = 0
    batch_size: int = 32
    preprocess: Preprocess = field(default_factory=Preprocess)  # from options: override the file
    preprocess_file: Path | None = None
    trust_code: bool = False


@dataclass(frozen=True)
class _Entry:
    label: str  # what an error message names: a file, "file.npy row 3", "gen:fn item 2"
    rows: int
    digest: bytes


class DataSource:
    """Samples of one source: iterate for batched feeds, ``feeds()`` for one feed per sample."""

    def __init__(self, kind: str, origin: str, specs: tuple[InputSpec, ...], entries: list[_Entry],
                 load: Callable[[Sequence[int]], Iterator[tuple[int, Feed]]], options: DataOptions,
                 indices: Sequence[int] | None = None, salt: str = "") -> None:
        self.kind, self.origin, self.specs = kind, origin, specs
        self._entries, self._load, self.options, self._salt = entries, load, options, salt
        self.indices = tuple(range(len(entries)) if indices is None else indices)

    @property
    def samples(self) -> int:
        return len(self.indices)

    @property
    def count(self) -> int:
        """Rows the model will see (a sample may hold several)."""
        return sum(self._entries[i].rows for i in self.indices)

    def __len__(self) -> int:
        return self.count

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(f"{DATA_FORMAT}|{self._salt}|".encode())
        for i in self.indices:
            h.update(self._entries[i].digest)
        return h.hexdigest()

    def subset(self, indices: Sequence[int]) -> DataSource:
        return DataSource(self.kind, self.origin, self.specs, self._entries, self._load, self.options,
                          sorted(indices), self._salt)

    def feeds(self) -> Iterator[Feed]:
        """One checked feed per sample, in order."""
        for _, feed in self._load(self.indices):
            yield feed

    def __iter__(self) -> Iterator[Feed]:
        return batches(self.feeds(), self.specs, self.options.batch_size)

    def describe(self) -> str:
        return f"{self.samples} {self.kind} samples from {self.origin}"


def open_data(path: str | Path, input_specs: Iterable[Any], options: DataOptions | None = None) -> DataSource:
    """The data source at ``path`` for a model with ``input_specs``, checked and hashed."""
    options = options or DataOptions()
    specs = as_specs(input_specs)
    text = str(path)
    p = Path(path)
    if not p.exists() and _GENERATOR.match(text):
        source = _generator_source(text, specs, options)
    elif p.is_dir():
        source = _folder_source(p, specs, options)
    elif p.is_file() and p.suffix.lower() in (".npy", ".npz"):
        source = _stacked_source(p, specs, options)
    elif p.is_file():
        raise InputError(f"{p}: not calibration data (expected a folder, a .npy/.npz file or module:function)")
    else:
        raise InputError(f"{p}: no such file or folder")
    if options.max_samples is not None:
        if options.max_samples <= 0:
            raise InputError("--max-samples must be a positive number")
        if options.max_samples < source.samples:
            pick = np.random.default_rng(options.seed).choice(source.samples, options.max_samples, replace=False)
            source = source.subset([source.indices[i] for i in pick])
    return source


def split_holdout(source: DataSource, n_holdout: int) -> tuple[DataSource, DataSource]:
    """(calibration, held-out): ``n_holdout`` seeded samples kept apart (at most half the source)."""
    n = max(0, min(n_holdout, source.samples // 2))
    pick = set(np.random.default_rng(source.options.seed + 1).choice(source.samples, n, replace=False).tolist())
    held = [idx for k, idx in enumerate(source.indices) if k in pick]
    kept = [idx for k, idx in enumerate(source.indices) if k not in pick]
    return source.subset(kept), source.subset(held)


# -- folders -----------------------------------------------------------------------------------

def _folder_source(folder: Path, specs: tuple[InputSpec, ...], options: DataOptions) -> DataSource:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not _hidden(f, folder))
    npz = [f for f in files if f.suffix.lower() == ".npz"]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    if npz and images:
        raise InputError(f"{folder}: holds both .npz files and images; point --data at one kind")
    if npz:
        return _npz_folder(folder, npz, specs, options)
    if images:
        return _image_folder(folder, images, specs, options)
    raise InputError(f"{folder}: no calibration data in it (no .npz files, no {'/'.join(IMAGE_SUFFIXES)} images)")


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def _read_npz(path: Path, label: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputError(f"{label}: holds pickled objects, which are never loaded; save plain arrays") from None
        raise InputError(f"{label}: not a readable .npz ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError, zlib.error) as exc:
        # a damaged archive: unknown compression method, "encrypted" flag, corrupt deflate stream
        raise InputError(f"{label}: not a readable .npz ({exc})") from None


def _npz_folder(folder: Path, files: list[Path], specs: tuple[InputSpec, ...], options: DataOptions) -> DataSource:
    entries = []
    for f in files:
        label = str(f.relative_to(folder))
        feed = check_feed(_read_npz(f, str(f)), specs, str(f))
        entries.append(_Entry(label, rows_of(feed), hashlib.sha256(label.encode() + digest_feed(feed)).digest()))

    def load(indices: Sequence[int]) -> Iterator[tuple[int, Feed]]:
        for i in indices:
            yield i, check_feed(_read_npz(files[i], str(files[i])), specs, str(files[i]))

    return DataSource("npz-folder", str(folder), specs, entries, load, options)


def _image_folder(folder: Path, files: list[Path], specs: tuple[InputSpec, ...], options: DataOptions) -> DataSource:
    spec = image_input(specs)
    pre = load_preprocess(options.preprocess_file) if options.preprocess_file else Preprocess()
    plan = resolve(pre.merged(options.preprocess), spec)
    entries = []
    for f in files:
        label = str(f.relative_to(folder))
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise InputError(f"{f}: cannot read ({exc.strerror})") from None
        check_image(data, str(f))
        h = hashlib.sha256(label.encode() + b"\0" + data).digest()
        entries.append(_Entry(label, 1, h))

    def load(indices: Sequence[int]) -> Iterator[tuple[int, Feed]]:
        for i in indices:
            yield i, load_image(files[i], plan, str(files[i]))

    return DataSource("image", str(folder), specs, entries, load, options, salt=plan.fingerprint())


# -- stacked arrays ----------------------------------------------------------------------------

def _stacked_source(path: Path, specs: tuple[InputSpec, ...], options: DataOptions) -> DataSource:
    if path.suffix.lower() == ".npy":
        if len(specs) != 1:
            raise InputError(
                f"{path}: a .npy holds one array but the model has inputs {', '.join(s.name for s in specs)}; "
                "use an .npz with one key per input, or a folder of .npz files"
            )
        try:
            arrays = {specs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
        except ValueError as exc:
            if "object" in str(exc).lower() or "pickle" in str(exc).lower():
                raise InputError(f"{path}: holds pickled Python objects, which are never loaded; save plain arrays") from None
            raise InputError(f"{path}: not a plain numeric .npy ({exc})") from None
        except OSError as exc:
            raise InputError(f"{path}: not a readable .npy ({exc})") from None
    else:
        arrays = _read_npz(path, str(path))
        if len(specs) == 1 and list(arrays) == ["arr_0"]:
            arrays = {specs[0].name: arrays["arr_0"]}
    if any(len(s.shape) == 0 for s in specs):
        raise InputError(f"{path}: a stacked batch needs inputs with a batch axis; the model has a scalar input")
    check_feed({k: v[:1] for k, v in arrays.items()}, specs, str(path))
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1:
        raise InputError(f"{path}: arrays disagree on the number of rows: {sorted(rows)}")
    n = rows.pop()
    if n == 0:
        raise InputError(f"{path}: holds no rows")
    step = max(1, 4096 // max(1, _row_items(arrays)))  # check and hash in chunks: flat memory
    entries = []
    for start in range(0, n, step):
        chunk = check_feed({k: v[start:start + step] for k, v in arrays.items()}, specs,
                           f"{path} rows {start}..{min(n, start + step) - 1}")
        for r in range(rows_of(chunk)):
            entries.append(_Entry(f"{path} row {start + r}", 1, digest_feed({k: v[r:r + 1] for k, v in chunk.items()})))

    def load(indices: Sequence[int]) -> Iterator[tuple[int, Feed]]:
        for i in indices:
            yield i, check_feed({k: v[i:i + 1] for k, v in arrays.items()}, specs, f"{path} row {i}")

    return DataSource("array", str(path), specs, entries, load, options)


def _row_items(arrays: dict[str, np.ndarray]) -> int:
    return sum(int(np.prod(a.shape[1:])) for a in arrays.values())


# -- generators --------------------------------------------------------------------------------

def _generator_source(ref: str, specs: tuple[InputSpec, ...], options: DataOptions) -> DataSource:
    if not options.trust_code:
        raise InputError(f"--data {ref}: a generator runs Python code; pass --trust-code to allow it")
    fn = import_callable(ref, "--data")
    limit = options.max_samples

    def run(indices: Sequence[int] | None) -> Iterator[tuple[int, Feed]]:
        wanted = None if indices is None else set(indices)
        last = None if indices is None else (max(indices) if indices else -1)
        for i, item in _call_generator(fn, ref, options.seed):
            if (limit is not None and i >= limit) or (last is not None and i > last):
                return
            if wanted is None or i in wanted:
                yield i, check_feed(_as_feed(item, specs, ref, i), specs, f"{ref} item {i}")

    entries = [_Entry(f"{ref} item {i}", rows_of(feed), digest_feed(feed)) for i, feed in run(None)]
    if not entries:
        raise InputError(f"--data {ref}: the generator yielded no samples")

    def load(indices: Sequence[int]) -> Iterator[tuple[int, Feed]]:
        for i, feed in run(indices):
            if digest_feed(feed) != entries[i].digest:
                raise InputError(f"--data {ref}: item {i} differs between two runs; the generator must be deterministic")
            yield i, feed

    return DataSource("generator", ref, specs, entries, load, options)


def _call_generator(fn: Callable, ref: str, seed: int) -> Iterator[tuple[int, Any]]:
    """Enumerate what ``fn`` yields; anything it raises becomes one InputError line."""
    try:
        params = inspect.signature(fn).parameters
        items = fn(seed=seed) if "seed" in params else fn()
        yield from enumerate(items)
    except InputError:
        raise
    except Exception as exc:  # user code may raise anything
        raise InputError(f"--data {ref}: the generator raised {type(exc).__name__}: {exc}") from None


def _as_feed(item: Any, specs: tuple[InputSpec, ...], ref: str, i: int) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if isinstance(item, np.ndarray) and len(specs) == 1:
        return {specs[0].name: item}
    if isinstance(item, (tuple, list)) and len(item) == len(specs):
        return {s.name: a for s, a in zip(specs, item, strict=True)}
    raise InputError(
        f"--data {ref}: item {i} is a {type(item).__name__}; yield dicts of input name -> array "
        f"(inputs: {', '.join(s.name for s in specs)})"
    )
