"""Megatron-core compatible ``.bin``/``.idx`` indexed datasets.

The on-disk format is exactly the one read and written by
``megatron.core.datasets.indexed_dataset`` (megatron-core 0.16):

``PREFIX.idx`` (all integers little-endian)::

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    u64       version (always 1)
    u8        dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
              8 uint16)
    u64       S = number of sequences
    u64       D = number of entries in the document index (number of documents + 1)
    int32[S]  sequence lengths (in elements)
    int64[S]  sequence pointers (byte offsets into the .bin file)
    int64[D]  document indices: 0, then for each document the index one past its last sequence
    int8[S]   sequence modes (only in multimodal datasets; megatron-core does not record the
              presence of this block in the header, the reader has to be told)

``PREFIX.bin``: the sequences' elements, back to back, in the dtype of the header.

This module adds what megatron-core does not do: atomic writes (temporary names renamed into
place on success, removed on failure), validation of a pair on open (magic, version, dtype, sizes,
pointers, document indices) with errors that name the file, and a streaming merge that copies
``.bin`` bytes and rebuilds the ``.idx`` with bounded memory.

The reader never imports torch or megatron-core.
"""
from __future__ import annotations

import os
import shutil
import struct
import uuid
from array import array
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from megatron_phi4.fileio import fsync_dir

__all__ = [
    "INDEX_HEADER",
    "INDEX_VERSION",
    "DTYPE_CODES",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "IndexedDataset",
    "IndexInfo",
    "read_index",
    "merge_indexed",
    "dtype_code",
    "dtype_from_code",
    "bin_path",
    "idx_path",
    "exists",
    "remove_dataset",
]

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_STRUCT = struct.Struct("<9sQBQQ")  # magic, version, dtype code, seq count, doc count
HEADER_SIZE = _HEADER_STRUCT.size  # 34

DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_CODE_TO_DTYPE = {code: dt for dt, code in DTYPE_CODES.items()}

# Elements/records processed per step when streaming large index arrays.
_CHUNK = 1 << 20


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, malformed, truncated or inconsistent."""


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def exists(prefix: str) -> bool:
    """True when both ``prefix.bin`` and ``prefix.idx`` exist."""
    return os.path.exists(bin_path(prefix)) and os.path.exists(idx_path(prefix))


def remove_dataset(prefix: str) -> None:
    """Remove ``prefix.bin`` and ``prefix.idx`` if present."""
    for p in (bin_path(prefix), idx_path(prefix)):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"dtype {dt} cannot be stored in an indexed dataset; "
            f"supported: {sorted(str(d) for d in DTYPE_CODES)}"
        )
    return DTYPE_CODES[dt]


def dtype_from_code(code: int, path: str = "<idx>") -> np.dtype:
    if code not in _CODE_TO_DTYPE:
        raise IndexedDatasetError(f"{path}: unknown dtype code {code} (expected 1..8)")
    return _CODE_TO_DTYPE[code]


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_index(
    f,
    dtype: np.dtype,
    lengths_chunks: Iterable[np.ndarray],
    pointer_chunks: Iterable[np.ndarray],
    doc_chunks: Iterable[np.ndarray],
    sequence_count: int,
    document_count: int,
) -> None:
    """Write a complete .idx to the open binary file ``f`` from chunked arrays."""
    f.write(_HEADER_STRUCT.pack(INDEX_HEADER, INDEX_VERSION, dtype_code(dtype), sequence_count,
                                document_count))
    n = 0
    for c in lengths_chunks:
        f.write(np.ascontiguousarray(c, dtype="<i4").tobytes())
        n += len(c)
    assert n == sequence_count, (n, sequence_count)
    n = 0
    for c in pointer_chunks:
        f.write(np.ascontiguousarray(c, dtype="<i8").tobytes())
        n += len(c)
    assert n == sequence_count, (n, sequence_count)
    n = 0
    for c in doc_chunks:
        f.write(np.ascontiguousarray(c, dtype="<i8").tobytes())
        n += len(c)
    assert n == document_count, (n, document_count)


def _pointer_chunks_iter(length_chunks, itemsize: int, base: int = 0):
    """Byte pointers (exclusive prefix sums of lengths*itemsize), chunk by chunk."""
    start = int(base)
    for lc in length_chunks:
        if len(lc) == 0:
            continue
        c = np.asarray(lc, dtype=np.int64) * itemsize
        cs = np.cumsum(c)
        ptr = np.empty_like(cs)
        ptr[0] = start
        ptr[1:] = cs[:-1] + start
        start += int(cs[-1])
        yield ptr


def _chunks(a: np.ndarray):
    for i in range(0, len(a), _CHUNK):
        yield a[i:i + _CHUNK]


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class _SpillArray:
    """An append-only int array that keeps at most ``limit`` entries in memory.

    Older entries are appended to a temporary file; :meth:`chunks` streams everything back.
    Keeps writer memory bounded however many sequences a dataset has.
    """

    def __init__(self, typecode: str, np_dtype: str, spill_path: str, limit: int) -> None:
        self.mem = array(typecode)
        self.np_dtype = np.dtype(np_dtype)
        self.spill_path = spill_path
        self.limit = limit
        self.spilled = 0
        self._f = None

    def __len__(self) -> int:
        return self.spilled + len(self.mem)

    def maybe_spill(self) -> None:
        if len(self.mem) >= self.limit:
            if self._f is None:
                self._f = open(self.spill_path, "wb")
            self._f.write(self.mem.tobytes())
            self.spilled += len(self.mem)
            self.mem = array(self.mem.typecode)

    def chunks(self):
        if self.spilled:
            self._f.flush()
            with open(self.spill_path, "rb") as f:
                left = self.spilled
                while left:
                    n = min(left, _CHUNK)
                    c = np.fromfile(f, dtype=self.np_dtype, count=n)
                    if len(c) != n:
                        raise IndexedDatasetError(f"{self.spill_path}: spill file truncated")
                    left -= n
                    yield c
        if len(self.mem):
            yield np.frombuffer(self.mem, dtype=self.np_dtype)

    def discard(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                pass
            self._f = None
        try:
            os.remove(self.spill_path)
        except FileNotFoundError:
            pass


class IndexedDatasetWriter:
    """Stream sequences into ``prefix.bin``/``prefix.idx``.

    Data goes to ``prefix.bin.tmp-<id>`` as it is added; :meth:`finalize` writes the index to
    ``prefix.idx.tmp-<id>``, fsyncs both and renames them to their final names (``.bin`` first,
    then ``.idx``). Used as a context manager it finalizes on a clean exit and removes its
    temporary files on an exception, so a final pair only ever appears complete.

    ``add_document(tokens)`` stores one sequence and ends a document (the usual case: one
    sequence per document). ``add_item(tokens)`` + ``end_document()`` build multi-sequence
    documents. ``add_documents(flat, lengths)`` adds many one-sequence documents at once.

    Memory is bounded: index entries beyond ``index_memory_entries`` spill to a temporary file.
    """

    def __init__(self, prefix: str, dtype=np.int32, buffer_size: int = 8 << 20,
                 index_memory_entries: int = 1 << 20) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validate
        self.itemsize = self.dtype.itemsize
        d = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(d, exist_ok=True)
        tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._bin_tmp = f"{bin_path(self.prefix)}.{tag}"
        self._idx_tmp = f"{idx_path(self.prefix)}.{tag}"
        self._closed = True  # until the data file is open
        self.finalized = False
        self._lengths = _SpillArray("i", "<i4", f"{self.prefix}.len.{tag}", index_memory_entries)
        self._doc_idx = _SpillArray("q", "<i8", f"{self.prefix}.doc.{tag}", index_memory_entries)
        self._doc_idx.mem.append(0)
        self._last_doc_end = 0
        self._num_tokens = 0
        self._bin = open(self._bin_tmp, "wb", buffering=buffer_size)
        self._closed = False

    # -- adding data ---------------------------------------------------------------------------
    def _as_array(self, tokens) -> np.ndarray:
        if isinstance(tokens, np.ndarray):
            arr = tokens
            if arr.dtype != self.dtype:
                if arr.size and np.issubdtype(self.dtype, np.integer):
                    info = np.iinfo(self.dtype)
                    lo, hi = arr.min(), arr.max()
                    if lo < info.min or hi > info.max:
                        raise IndexedDatasetError(
                            f"{self.prefix}: values in [{lo}, {hi}] do not fit {self.dtype}")
                arr = arr.astype(self.dtype)
        else:
            try:
                arr = np.asarray(tokens, dtype=self.dtype)
            except OverflowError as e:
                raise IndexedDatasetError(
                    f"{self.prefix}: value does not fit {self.dtype}: {e}") from None
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        return arr

    def _check_open(self) -> None:
        if self._closed:
            raise IndexedDatasetError(f"{self.prefix}: writer already finalized or aborted")

    def _push_lengths(self, lens: np.ndarray) -> None:
        self._lengths.mem.frombytes(np.ascontiguousarray(lens, dtype="<i4").tobytes())
        self._lengths.maybe_spill()

    def _end_doc(self) -> None:
        n = len(self._lengths)
        self._doc_idx.mem.append(n)
        self._last_doc_end = n
        self._doc_idx.maybe_spill()

    def add_item(self, tokens: Union[np.ndarray, Sequence[int]]) -> None:
        """Append one sequence (not ending the document)."""
        self._check_open()
        arr = self._as_array(tokens)
        if arr.size > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{self.prefix}: sequence of {arr.size} elements > int32")
        self._bin.write(arr.tobytes())
        self._lengths.mem.append(int(arr.size))
        self._lengths.maybe_spill()
        self._num_tokens += int(arr.size)

    def end_document(self) -> None:
        """Close the current document (after one or more :meth:`add_item`)."""
        self._check_open()
        self._end_doc()

    def add_document(self, tokens: Union[np.ndarray, Sequence[int]],
                     lengths: Optional[Sequence[int]] = None) -> None:
        """Append a document: one sequence, or several when ``lengths`` splits ``tokens``."""
        self._check_open()
        arr = self._as_array(tokens)
        if lengths is None:
            lens = np.array([arr.size], dtype=np.int64)
        else:
            lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
            if int(lens.sum()) != arr.size or (lens.size and lens.min() < 0):
                raise IndexedDatasetError(
                    f"{self.prefix}: lengths {list(lens)} do not sum to {arr.size}")
        if lens.size and lens.max() > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{self.prefix}: sequence longer than int32")
        self._bin.write(arr.tobytes())
        self._push_lengths(lens)
        self._num_tokens += int(arr.size)
        self._end_doc()

    def add_documents(self, flat_tokens: Union[np.ndarray, Sequence[int]],
                      lengths: Union[np.ndarray, Sequence[int]]) -> None:
        """Append ``len(lengths)`` one-sequence documents stored back to back in ``flat_tokens``."""
        self._check_open()
        arr = self._as_array(flat_tokens)
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if int(lens.sum()) != arr.size or (lens.size and lens.min() < 0):
            raise IndexedDatasetError(f"{self.prefix}: lengths do not sum to {arr.size}")
        if lens.size and lens.max() > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{self.prefix}: sequence longer than int32")
        self._bin.write(arr.tobytes())
        first = len(self._lengths)
        self._push_lengths(lens)
        if lens.size:
            self._doc_idx.mem.frombytes(
                np.arange(first + 1, first + 1 + lens.size, dtype="<i8").tobytes())
            self._last_doc_end = first + lens.size
            self._doc_idx.maybe_spill()
        self._num_tokens += int(arr.size)

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (dtype must match)."""
        self._check_open()
        src = read_index(idx_path(prefix))
        if src.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{prefix}: dtype {src.dtype} differs from the writer's {self.dtype}")
        bsize = os.path.getsize(bin_path(prefix))
        if bsize != src.data_nbytes:
            raise IndexedDatasetError(f"{bin_path(prefix)}: {bsize} bytes, index describes "
                                      f"{src.data_nbytes} (truncated or mismatched pair)")
        offset = len(self._lengths)
        for c in _chunks(src.sequence_lengths):
            self._push_lengths(c)
        for c in _chunks(src.document_indices[1:]):
            self._doc_idx.mem.frombytes((c.astype(np.int64) + offset).astype("<i8").tobytes())
            self._doc_idx.maybe_spill()
        self._last_doc_end = len(self._lengths)
        self._num_tokens += src.num_tokens
        del src
        _copy_file_into(bin_path(prefix), self._bin)

    # -- state ---------------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    # -- completion ----------------------------------------------------------------------------
    def finalize(self) -> None:
        """Write the index and atomically move both files into place."""
        self._check_open()
        if self._last_doc_end != len(self._lengths):
            # trailing items without end_document(): close the document (megatron-core refuses
            # an index whose last document index is not the sequence count).
            self._end_doc()
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            with open(self._idx_tmp, "wb", buffering=8 << 20) as f:
                _write_index(
                    f, self.dtype, self._lengths.chunks(),
                    _pointer_chunks_iter(self._lengths.chunks(), self.itemsize),
                    self._doc_idx.chunks(), len(self._lengths), len(self._doc_idx))
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._bin_tmp, bin_path(self.prefix))
            os.replace(self._idx_tmp, idx_path(self.prefix))
            fsync_dir(os.path.dirname(os.path.abspath(self.prefix)) or ".")
        except BaseException:
            self.abort()
            raise
        self._lengths.discard()
        self._doc_idx.discard()
        self._closed = True
        self.finalized = True

    def abort(self) -> None:
        """Discard everything written so far (temporary files are removed)."""
        self._closed = True
        try:
            self._bin.close()
        except Exception:
            pass
        for p in (self._bin_tmp, self._idx_tmp):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        self._lengths.discard()
        self._doc_idx.discard()

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()

    def __del__(self) -> None:
        # A writer dropped without finalize() leaves no temporary files behind.
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class IndexInfo:
    """The parsed, validated contents of a ``.idx`` file (arrays are read-only memory maps)."""

    def __init__(self, path: str, dtype: np.dtype, sequence_lengths: np.ndarray,
                 sequence_pointers: np.ndarray, document_indices: np.ndarray,
                 sequence_modes: Optional[np.ndarray], mmap) -> None:
        self.path = path
        self.dtype = dtype
        self.sequence_lengths = sequence_lengths
        self.sequence_pointers = sequence_pointers
        self.document_indices = document_indices
        self.sequence_modes = sequence_modes
        self._mmap = mmap

    @property
    def sequence_count(self) -> int:
        return len(self.sequence_lengths)

    @property
    def document_count(self) -> int:
        return len(self.document_indices)

    @property
    def data_nbytes(self) -> int:
        """Size the matching .bin must have."""
        if self.sequence_count == 0:
            return 0
        last = int(self.sequence_lengths[-1]) * self.dtype.itemsize
        return int(self.sequence_pointers[-1]) + last

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def read_index(path: str, multimodal: bool = False, validate: bool = True) -> IndexInfo:
    """Parse and validate an ``.idx`` file (``path`` may be the file or the prefix)."""
    if not path.endswith(".idx"):
        path = idx_path(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise IndexedDatasetError(f"{path}: index file cannot be read: {e}") from None
    if size < HEADER_SIZE:
        raise IndexedDatasetError(
            f"{path}: truncated index: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    with open(path, "rb") as f:
        magic, version, code, seq_count, doc_count = _HEADER_STRUCT.unpack(f.read(HEADER_SIZE))
    if magic != INDEX_HEADER:
        raise IndexedDatasetError(f"{path}: bad magic {magic!r}, expected {INDEX_HEADER!r} "
                                  f"(not a megatron MMIDIDX index)")
    if version != INDEX_VERSION:
        raise IndexedDatasetError(f"{path}: unsupported index version {version} (expected 1)")
    dtype = dtype_from_code(code, path)
    expected = HEADER_SIZE + seq_count * (4 + 8) + doc_count * 8
    expected_mm = expected + seq_count
    want = expected_mm if multimodal else expected
    if size != want:
        hint = ""
        if not multimodal and size == expected_mm and seq_count:
            hint = " (the size matches a multimodal index: open it with multimodal=True)"
        raise IndexedDatasetError(
            f"{path}: index size {size} bytes does not match its header ({seq_count} sequences, "
            f"{doc_count} document-index entries -> {want} bytes); the file is "
            f"{'truncated' if size < want else 'corrupt or has trailing bytes'}{hint}")
    if size > HEADER_SIZE:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    else:
        mm = np.zeros(HEADER_SIZE, np.uint8)
    off = HEADER_SIZE
    lengths = np.frombuffer(mm, dtype="<i4", count=seq_count, offset=off)
    off += lengths.nbytes
    pointers = np.frombuffer(mm, dtype="<i8", count=seq_count, offset=off)
    off += pointers.nbytes
    docs = np.frombuffer(mm, dtype="<i8", count=doc_count, offset=off)
    off += docs.nbytes
    modes = np.frombuffer(mm, dtype=np.int8, count=seq_count, offset=off) if multimodal else None
    info = IndexInfo(path, dtype, lengths, pointers, docs, modes, mm)
    if validate:
        _validate_index(info)
    return info


def _validate_index(info: IndexInfo) -> None:
    path = info.path
    lengths, pointers, docs = info.sequence_lengths, info.sequence_pointers, info.document_indices
    n = len(lengths)
    if len(docs) == 0:
        raise IndexedDatasetError(f"{path}: empty document index (must start with 0)")
    if docs[0] != 0:
        raise IndexedDatasetError(f"{path}: document index starts at {docs[0]}, expected 0")
    if docs[-1] != n:
        raise IndexedDatasetError(
            f"{path}: last document index {docs[-1]} != number of sequences {n}")
    itemsize = info.dtype.itemsize
    pos = 0
    for i in range(0, n, _CHUNK):
        lc = lengths[i:i + _CHUNK]
        if lc.min() < 0:
            j = i + int(np.argmin(lc))
            raise IndexedDatasetError(f"{path}: negative length {lengths[j]} at sequence {j}")
        pc = pointers[i:i + _CHUNK]
        nb = lc.astype(np.int64) * itemsize
        exp = np.empty(len(nb), np.int64)
        exp[0] = pos
        np.cumsum(nb[:-1], out=exp[1:])
        exp[1:] += pos
        bad = np.nonzero(pc != exp)[0]
        if bad.size:
            j = i + int(bad[0])
            raise IndexedDatasetError(
                f"{path}: sequence pointer {pointers[j]} at sequence {j} does not follow the "
                f"lengths (expected {exp[bad[0]]})")
        pos = int(exp[-1] + nb[-1])
    for i in range(0, len(docs), _CHUNK):
        dc = docs[max(i - 1, 0):i + _CHUNK]
        if dc.size > 1 and np.any(np.diff(dc) < 0):
            raise IndexedDatasetError(f"{path}: document indices are not non-decreasing")


class IndexedDataset:
    """Memory-mapped reader of a ``prefix.bin``/``prefix.idx`` pair.

    ``len(ds)`` is the number of sequences (= documents for data written one sequence per
    document, as all our tools do); ``ds[i]`` is a read-only ``np.ndarray`` view; slices with
    step 1 return a list of arrays. The pair is validated on open: magic, version, dtype code,
    index size vs header, pointers vs lengths, document indices, and the ``.bin`` size vs the
    index. Problems raise :class:`IndexedDatasetError` naming the file.
    """

    def __init__(self, prefix: str, multimodal: bool = False, validate: bool = True) -> None:
        self.path_prefix = str(prefix)
        self.multimodal = multimodal
        self._bin_path = bin_path(self.path_prefix)
        self._idx_path = idx_path(self.path_prefix)
        missing = [p for p in (self._idx_path, self._bin_path) if not os.path.exists(p)]
        if missing:
            raise IndexedDatasetError(
                f"indexed dataset {self.path_prefix!r}: missing {', '.join(missing)}")
        self.index = read_index(self._idx_path, multimodal=multimodal, validate=validate)
        self.dtype = self.index.dtype
        bsize = os.path.getsize(self._bin_path)
        want = self.index.data_nbytes
        if bsize != want:
            what = "truncated" if bsize < want else "longer than its index"
            raise IndexedDatasetError(
                f"{self._bin_path}: data file is {what}: {bsize} bytes, but {self._idx_path} "
                f"describes {self.index.sequence_count} sequences / {self.index.num_tokens} "
                f"elements of {self.dtype} = {want} bytes (mismatched or incomplete pair)")
        if bsize:
            self._mmap = np.memmap(self._bin_path, dtype=self.dtype, mode="r")
            self._data = self._mmap.view(np.ndarray)
        else:
            self._data = np.zeros(0, self.dtype)

    def __reduce__(self):
        # Pickle by path (DataLoader workers, spawn): reopen the maps, never copy the data.
        return (_reopen, (self.path_prefix, self.multimodal))

    # -- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.index.sequence_count

    def _elem_offset(self, i: int) -> int:
        return int(self.index.sequence_pointers[i]) // self.dtype.itemsize

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            n = len(self)
            i = int(idx)
            if i < 0:
                i += n
            if not 0 <= i < n:
                raise IndexError(f"index {idx} out of range for {n} sequences")
            start = self._elem_offset(i)
            return self._data[start:start + int(self.index.sequence_lengths[i])]
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("slices into an IndexedDataset must be contiguous")
            if start >= stop:
                return []
            lens = self.index.sequence_lengths[start:stop].astype(np.int64)
            s0 = self._elem_offset(start)
            flat = self._data[s0:s0 + int(lens.sum())]
            return np.split(flat, np.cumsum(lens)[:-1])
        raise TypeError(f"unexpected index type {type(idx)}")

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Elements ``[offset, offset+length)`` of sequence ``idx``."""
        seq = self[int(idx)]
        if length is None:
            length = len(seq) - offset
        if offset < 0 or length < 0 or offset + length > len(seq):
            raise IndexError(f"offset {offset} + length {length} outside sequence {idx} "
                             f"of length {len(seq)}")
        return seq[offset:offset + length]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # -- metadata ------------------------------------------------------------------------------
    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.index.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        return self.index.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        return self.index.document_indices

    @property
    def sequence_modes(self) -> Optional[np.ndarray]:
        return self.index.sequence_modes

    @property
    def num_documents(self) -> int:
        return self.index.document_count - 1

    @property
    def num_sequences(self) -> int:
        return self.index.sequence_count

    @property
    def num_tokens(self) -> int:
        return self.index.num_tokens

    @staticmethod
    def exists(prefix: str) -> bool:
        return exists(prefix)

    def close(self) -> None:
        self._data = np.zeros(0, self.dtype)
        self.index = IndexInfo(self.index.path, self.dtype, np.zeros(0, np.int32),
                               np.zeros(0, np.int64), np.zeros(1, np.int64), None, None)

    def __enter__(self) -> "IndexedDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, "
                f"documents={self.num_documents}, dtype={self.dtype})")


def _reopen(prefix: str, multimodal: bool) -> "IndexedDataset":
    # Validated when first opened; a re-open after unpickling checks sizes only.
    return IndexedDataset(prefix, multimodal=multimodal, validate=False)


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


def _copy_file_into(src_path: str, dst) -> None:
    """Append the bytes of ``src_path`` to the open binary file ``dst`` (copy_file_range if possible)."""
    dst.flush()
    size = os.path.getsize(src_path)
    if size == 0:
        return
    with open(src_path, "rb") as src:
        copied = 0
        try:
            while copied < size:
                n = os.copy_file_range(src.fileno(), dst.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except (AttributeError, OSError):
            pass
        if copied < size:
            src.seek(copied)
            dst.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, dst, 16 << 20)


def merge_indexed(prefixes: Sequence[str], output_prefix: str, dtype=None,
                  validate: bool = True) -> IndexInfo:
    """Concatenate datasets (in the given order) into ``output_prefix``.

    ``.bin`` bytes are copied as-is and the ``.idx`` is rebuilt with streaming memory (one input
    index mapped at a time). All inputs must share one dtype (``dtype``, when given, must match
    too). The output is byte-identical to writing all sequences with one
    :class:`IndexedDatasetWriter`, and appears atomically. Returns the output's index info.
    """
    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise IndexedDatasetError("merge_indexed: no input datasets")
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise IndexedDatasetError(f"merge_indexed: output {output_prefix} is also an input")
    infos = []
    for p in prefixes:
        info = read_index(idx_path(p), validate=validate)
        bsize = os.path.getsize(bin_path(p)) if os.path.exists(bin_path(p)) else None
        if bsize is None:
            raise IndexedDatasetError(f"{bin_path(p)}: missing data file")
        if bsize != info.data_nbytes:
            raise IndexedDatasetError(
                f"{bin_path(p)}: data file is {bsize} bytes but its index describes "
                f"{info.data_nbytes} bytes (truncated or mismatched pair)")
        infos.append((p, info.dtype, info.sequence_count, info.document_count, info.data_nbytes))
        del info
    dtypes = {d for _, d, *_ in infos}
    if dtype is not None:
        dtypes.add(np.dtype(dtype))
    if len(dtypes) != 1:
        detail = ", ".join(f"{p}: {d}" for p, d, *_ in infos)
        raise IndexedDatasetError(f"merge_indexed: inputs have different dtypes ({detail})")
    out_dtype = dtypes.pop()
    seq_total = sum(s for _, _, s, _, _ in infos)
    doc_total = 1 + sum(d - 1 for _, _, _, d, _ in infos)

    writer = IndexedDatasetWriter(output_prefix, dtype=out_dtype)
    try:
        for p, *_ in infos:
            _copy_file_into(bin_path(p), writer._bin)
        writer._bin.flush()
        os.fsync(writer._bin.fileno())
        writer._bin.close()

        def lengths_iter():
            for p, *_ in infos:
                info = read_index(idx_path(p), validate=False)
                yield from _chunks(info.sequence_lengths)

        def pointer_iter():
            base = 0
            for p, _, _, _, nbytes in infos:
                info = read_index(idx_path(p), validate=False)
                for c in _chunks(info.sequence_pointers):
                    yield c.astype(np.int64) + base
                base += nbytes

        def doc_iter():
            yield np.zeros(1, np.int64)
            base = 0
            for p, _, s, _, _ in infos:
                info = read_index(idx_path(p), validate=False)
                for c in _chunks(info.document_indices[1:]):
                    yield c.astype(np.int64) + base
                base += s

        with open(writer._idx_tmp, "wb", buffering=8 << 20) as f:
            _write_index(f, out_dtype, lengths_iter(), pointer_iter(), doc_iter(), seq_total,
                         doc_total)
            f.flush()
            os.fsync(f.fileno())
        os.replace(writer._bin_tmp, bin_path(output_prefix))
        os.replace(writer._idx_tmp, idx_path(output_prefix))
        fsync_dir(os.path.dirname(os.path.abspath(output_prefix)) or ".")
        writer._closed = True
        writer.finalized = True
    except BaseException:
        writer.abort()
        raise
    return read_index(idx_path(output_prefix), validate=False)
