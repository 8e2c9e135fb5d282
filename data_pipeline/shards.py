"""Stage 4, webdataset tar shards: writing them atomically, and reading samples back by position.

A sample is three members of one key, written with webdataset's TarWriter (so any webdataset pipeline can
read the shards): `<key>.tokens.npy` (uint32: the vocabulary exceeds 65,535), `<key>.lang.npy` (uint16) and
`<key>.doc.npy` (uint32), each of length seq_len + 1. Shards are written to a temp file and renamed when
complete; their size and sha256 go into the manifest.

For reading, the stream needs random access by (shard, sample) so that positions can be resumed exactly and
split across any number of consumers. `ShardReader` indexes a shard's tar headers once (via `tarfile`) and
then reads each sample with one positioned read. It verifies what it reads: file size, sha256 (optional),
member shapes and dtypes, language ids and token ids in range. Corrupt samples raise `ShardError` naming the
shard and sample, or, with on_error="skip", are counted and skipped.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fuxi.common.atomic import publish, sha256_file
from fuxi.data_pipeline.config import OnError
from fuxi.data_pipeline.errors import ShardError
from fuxi.data_pipeline.manifest import DOC_DTYPE, LANG_DTYPE, TOKEN_DTYPE, Manifest, ShardInfo

log = logging.getLogger(__name__)
MEMBERS = ("doc.npy", "lang.npy", "tokens.npy")  # TarWriter writes a sample's members in sorted order
DTYPES = {"tokens.npy": np.dtype(TOKEN_DTYPE), "lang.npy": np.dtype(LANG_DTYPE), "doc.npy": np.dtype(DOC_DTYPE)}


@dataclass
class Block:
    """One packed sample: seq_len + 1 tokens with each token's language index and document index."""
    tokens: np.ndarray
    lang_ids: np.ndarray
    doc_ids: np.ndarray


class ShardWriter:
    """Writes blocks of one language into shards of about `max_bytes`, each renamed into place when full."""

    def __init__(self, out_dir: Path, prefix: str, language: str, languages: list[str], max_bytes: int):
        import webdataset as wds
        self._wds = wds
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.language = language
        self.languages = languages
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._tmp: str | None = None
        self._file = None
        self._tar = None
        self._samples = 0
        self._tokens = np.zeros(len(languages), dtype=np.int64)
        self._index = 0  # sample index within this writer (keys are prefix-index, unique in a dataset)

    def _open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".shard.", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        # mtime fixed: the same data gives byte-identical shards (and the same sha256). Members are encoded
        # here (npy_bytes) rather than by TarWriter's encoder, and written as plain USTAR entries (short
        # names, no pax headers): both only for speed, the files are standard webdataset tars either way.
        self._tar = self._wds.TarWriter(self._file, mtime=0, user="fuxi", group="fuxi", encoder=False)
        self._tar.tarstream.format = tarfile.USTAR_FORMAT
        self._samples = 0
        self._tokens = np.zeros(len(self.languages), dtype=np.int64)

    def write(self, block: Block) -> None:
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": f"{self.prefix}-{self._index:09d}", "tokens.npy": npy_bytes(block.tokens),
                         "lang.npy": npy_bytes(block.lang_ids), "doc.npy": npy_bytes(block.doc_ids)})
        self._index += 1
        self._samples += 1
        self._tokens += np.bincount(block.lang_ids, minlength=len(self.languages))
        if self._file.tell() >= self.max_bytes:
            self._finish()

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # closes the tar stream; the file object is ours to close
        if not self._file.closed:
            self._file.close()
        name = f"{self.prefix}-{len(self.shards):05d}.tar"
        final = self.out_dir / name
        publish(self._tmp, final)
        self.shards.append(ShardInfo(path=name, language=self.language, samples=self._samples,
                                     bytes=os.path.getsize(final), sha256=sha256_file(final),
                                     tokens_per_language={lang: int(n) for lang, n in
                                                          zip(self.languages, self._tokens) if n}))
        self._tar = self._file = self._tmp = None

    def close(self) -> list[ShardInfo]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written. Its tar stream is closed here, errors ignored (on a full disk its last
        block cannot be written either): left open, it would try again when collected and print an ignored
        "write to closed file" traceback."""
        if self._tmp is not None:
            tar, file, tmp = self._tar, self._file, self._tmp
            self._tar = self._file = self._tmp = None
            with contextlib.suppress(OSError, ValueError):
                tar.close()
            with contextlib.suppress(OSError, ValueError):
                file.close()
            os.unlink(tmp)


_HEADERS: dict[tuple[str, int], bytes] = {}


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """The exact .npy header numpy writes for a 1-D array of `length` elements of `dtype`."""
    key = (dtype.str, length)
    if key not in _HEADERS:
        f = io.BytesIO()
        np.save(f, np.zeros(length, dtype=dtype))
        _HEADERS[key] = f.getvalue()[:-length * dtype.itemsize]
    return _HEADERS[key]


def npy_bytes(array: np.ndarray) -> bytes:
    """A 1-D array as .npy file bytes (what np.save writes), with the header cached."""
    return _npy_header(array.dtype, len(array)) + np.ascontiguousarray(array).tobytes()


def _decode_npy(buf: memoryview, expected: np.dtype, length: int) -> np.ndarray:
    """A 1-D .npy member; the header is compared byte for byte with the one we write (fast), and parsed
    by numpy only to explain a mismatch."""
    header = _npy_header(expected, length)
    if len(buf) == len(header) + length * expected.itemsize and buf[:len(header)] == header:
        return np.frombuffer(buf, dtype=expected, count=length, offset=len(header))
    f = io.BytesIO(buf)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran or dtype != expected or shape != (length,):
        raise ValueError(f"expected {expected}[{length}], found {dtype}{list(shape)}")
    if len(buf) - f.tell() < length * dtype.itemsize:
        raise ValueError(f"member holds {len(buf) - f.tell()} bytes, {length * dtype.itemsize} expected")
    return np.frombuffer(buf, dtype=dtype, count=length, offset=f.tell())


class ShardReader:
    """Random access to the samples of one shard, with its integrity checked against the manifest.

    A shard file that is missing, or whose size or sha256 disagrees with the manifest, cannot be trusted in any
    part: with on_error="raise" it is a ShardError, with "skip" every one of its samples reads as None (and is
    counted in `skipped`), as does each corrupt sample of an intact file."""

    def __init__(self, manifest: Manifest, shard: ShardInfo, verify_checksum: bool = True,
                 on_error: OnError = "raise"):
        self.manifest = manifest
        self.shard = shard
        self.path = manifest.shard_path(shard)
        self.on_error = on_error
        self.skipped = 0  # samples read as None (on_error="skip")
        self._fd = None
        self.usable = self._check_file(verify_checksum)
        self._index = self._build_index() if self.usable else []
        if self.usable:
            self._fd = os.open(self.path, os.O_RDONLY)

    def _fail(self, message: str, whole_shard: bool = False) -> None:
        """Raise, or warn when skipping (saying, for a whole shard, that its samples are replaced: only then)."""
        if self.on_error == "raise":
            raise ShardError(message)
        replaced = f"; its {self.shard.samples} samples are replaced" if whole_shard else ""
        log.warning("%s%s (on_error=skip: continuing)", message, replaced)

    def _check_file(self, verify_checksum: bool) -> bool:
        """Whether the file is the one the manifest describes (raises, or warns when skipping). A remote
        manifest's shard is fetched first (Manifest.fetch_shard)."""
        if self.manifest.remote is not None:
            try:
                self.manifest.fetch_shard(self.shard)
            except ShardError as err:
                self._fail(f"{err}; its {self.shard.samples} samples are replaced")
                return False
        if not self.path.is_file():
            self._fail(f"shard {self.path}: missing (listed in {self.manifest.path})", whole_shard=True)
            return False
        size = os.path.getsize(self.path)
        if size != self.shard.bytes:
            self._fail(f"shard {self.path}: {size} bytes on disk but the manifest {self.manifest.path} says "
                       f"{self.shard.bytes} (truncated or rewritten?)", whole_shard=True)
            return False
        if verify_checksum:
            digest = sha256_file(self.path)
            if digest != self.shard.sha256:
                self._fail(f"shard {self.path}: sha256 {digest[:16]}... disagrees with the manifest's "
                           f"{self.shard.sha256[:16]}... ({self.manifest.path})", whole_shard=True)
                return False
        return True

    def _build_index(self) -> list[tuple[str, int, int, dict[str, tuple[int, int]]]]:
        """(key, span start, span end, {member: (offset, size)}) per complete sample, in file order."""
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        order: list[str] = []
        try:
            with tarfile.open(self.path, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, _, ext = info.name.partition(".")
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext] = (info.offset_data, info.size)
        except (tarfile.TarError, EOFError, OSError) as err:
            self._fail(f"shard {self.path}: unreadable tar after {len(order)} samples ({err})")
        index = []
        for key in order:
            members = groups[key]
            if all(m in members for m in MEMBERS):
                start = min(members[m][0] for m in MEMBERS)
                end = max(members[m][0] + members[m][1] for m in MEMBERS)
                if end - start > 4 * 3 * self.manifest.block_len + 3 * 4096:
                    self._fail(f"shard {self.path}: sample {key}: members are not adjacent")
                    continue
                index.append((key, start, end, members))
        if len(index) != self.shard.samples:
            self._fail(f"shard {self.path}: {len(index)} complete samples but the manifest says "
                       f"{self.shard.samples} (truncated or corrupt)")
        return index

    def __len__(self) -> int:
        return self.shard.samples

    def read(self, i: int) -> Block | None:
        """Sample `i` of the shard, or None if it is missing/corrupt and on_error="skip"."""
        if not self.usable or i >= len(self._index):  # warned about once, when the file or index was checked
            if self.on_error == "raise":
                raise ShardError(f"shard {self.path}: sample {i} is missing")
            self.skipped += 1
            return None
        key, start, end, members = self._index[i]
        data = memoryview(os.pread(self._fd, end - start, start))
        block_len = self.manifest.block_len
        try:
            arrays = {}
            for m in MEMBERS:
                off, size = members[m]
                arrays[m] = _decode_npy(data[off - start:off - start + size], DTYPES[m], block_len)
            tokens, lang_ids, doc_ids = arrays["tokens.npy"], arrays["lang.npy"], arrays["doc.npy"]
            if int(lang_ids.max()) >= len(self.manifest.languages):
                raise ValueError(f"language index {int(lang_ids.max())} >= {len(self.manifest.languages)} "
                                 "languages")
            if int(tokens.max()) >= self.manifest.vocab_size:
                raise ValueError(f"token id {int(tokens.max())} >= vocab size {self.manifest.vocab_size}")
            if block_len > 1 and bool((np.diff(doc_ids.astype(np.int64)) < 0).any()):
                raise ValueError("document ids decrease within the block")
        except ValueError as err:
            self._fail(f"shard {self.path}: sample {key} (#{i}) is corrupt: {err}")
            self.skipped += 1
            return None
        return Block(tokens, lang_ids, doc_ids)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def verify_shards(manifest: Manifest, progress: bool = False) -> int:
    """Check every shard against the manifest and decode every sample: file size and sha256, sample count,
    member names, dtypes and lengths, token ids below the vocabulary size, language ids among the manifest's
    languages, document ids non-decreasing, and tokens per language equal to the manifest's. The first
    problem is a ShardError naming the shard (and sample). Returns the number of samples."""
    from tqdm import tqdm

    total = 0
    for shard in tqdm(manifest.shards, desc="verify", unit="shard", disable=not progress):
        reader = ShardReader(manifest, shard, verify_checksum=True, on_error="raise")
        counts = np.zeros(len(manifest.languages), dtype=np.int64)
        try:
            for i in range(len(reader)):
                counts += np.bincount(reader.read(i).lang_ids, minlength=len(manifest.languages))
        finally:
            reader.close()
        found = {lang: int(n) for lang, n in zip(manifest.languages, counts) if n}
        if found != shard.tokens_per_language:
            raise ShardError(f"shard {reader.path}: tokens per language {found} disagree with the manifest's "
                             f"{shard.tokens_per_language} ({manifest.path})")
        total += len(reader)
    return total


def webdataset_pipeline(manifest: Manifest, shuffle_shards: bool = False, seed: int = 0):
    """The shards as a plain webdataset pipeline (explicit node splitter, empty_check off, .npy decoding).

    Not resumable and split at shard level, as webdataset does; the training stream uses `ShardReader` for
    exact positions instead. Useful for inspection and for streaming from URLs with webdataset's gopen.
    """
    import webdataset as wds
    urls = [str(manifest.shard_path(s)) for s in manifest.shards]
    return wds.WebDataset(urls, shardshuffle=(len(urls) if shuffle_shards else False), seed=seed,
                          nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                          empty_check=False).decode()


def iter_blocks(manifest: Manifest) -> Iterator[tuple[str, Block]]:
    """Every sample of every shard, in manifest order, read through webdataset."""
    for sample in webdataset_pipeline(manifest):
        yield sample["__key__"], Block(sample["tokens.npy"], sample["lang.npy"], sample["doc.npy"])
