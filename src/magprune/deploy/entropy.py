"""Deploy room (entropy coding): canonical Huffman streams and the shared-weight encoding of the compressed format.

The ``shared`` encoding (compressed format version 3) stores a tensor whose nonzero entries take few distinct
values the way Deep Compression does (Han, Mao and Dally 2016, section 4 and Fig. 2), as one byte array (one
tensor of the file: fewer header entries) of three parts:

- ``codebook``: the distinct nonzero values (as bit patterns, so the round trip is exact), in ascending order;
- ``gaps``: the sparse structure as relative indices of ``index_bits`` bits over the flattened tensor: symbol
  ``g < 2**index_bits - 1`` skips ``g`` zeros and takes the next entry; symbol ``2**index_bits - 1`` is a filler
  that skips that many zeros and takes nothing (where a gap overflows);
- ``indices``: the codebook index of every nonzero entry, in order.

The two symbol streams are entropy-coded, each by whichever of Huffman (as in the paper), lzma, zlib or plain
fixed-width bit packing gives the fewest bytes; ``index_bits`` is chosen per tensor (1 to 8) for the fewest bytes.
A stream is one byte array: a coder byte, then for Huffman the code length of every symbol (4 bits each), the
bit offset of every chunk of :data:`CHUNK` symbols after the first (uint32), and the bits, most significant first.
The chunk offsets let the decoder run all chunks side by side in numpy (a Huffman decode is otherwise serial).
"""

from __future__ import annotations

import heapq
import lzma
import math
import zlib
from dataclasses import dataclass

import numpy as np

CODERS = ("packed", "huffman", "zlib", "lzma")
PACKED, HUFFMAN, ZLIB, LZMA = range(4)
MAX_CODE_BITS = 15  # longest Huffman code (its length fits 4 bits); decoding reads windows of this many bits
CHUNK = 4096  # symbols per independently decodable Huffman chunk
MAX_INDEX_BITS = 8
LZMA_PRESET = 6  # 8 MiB dictionary: preset 9 allocates 64 MiB per call, which made saving 10x slower


class EncodingError(ValueError):
    """An entropy-coded stream is malformed (the file format adds the file and tensor names)."""


# ----------------------------------------------------------------------------------------------- Huffman
def huffman_lengths(counts: np.ndarray, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Code length per symbol (0 for an unused one) of a Huffman code for ``counts``, at most ``max_bits`` long.

    A code that comes out too long is rebuilt from flattened counts (halved, kept >= 1) until it fits; with at
    most 256 symbols that takes a step or two and costs a fraction of a percent."""
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    weights = counts[used].copy()
    while True:
        heap = [(int(w), i, (i,)) for i, w in enumerate(weights)]
        heapq.heapify(heap)
        depth = np.zeros(used.size, dtype=np.int64)
        tie = used.size
        while len(heap) > 1:
            w1, _, a = heapq.heappop(heap)
            w2, _, b = heapq.heappop(heap)
            depth[list(a + b)] += 1
            heapq.heappush(heap, (w1 + w2, tie, a + b))
            tie += 1
        if depth.max() <= max_bits:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol for ``lengths`` (shorter codes first, ties by symbol)."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code += 1
        previous = int(lengths[symbol])
    return codes


def _pack_bits(symbols: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated codes of ``symbols`` as bytes and the bit offset of every symbol."""
    sym_lengths = lengths[symbols]
    starts = np.concatenate([[0], np.cumsum(sym_lengths)])
    bits = np.zeros(int(starts[-1]), dtype=np.uint8)
    sym_codes = codes[symbols]
    for j in range(int(sym_lengths.max()) if symbols.size else 0):
        has = sym_lengths > j
        bits[starts[:-1][has] + j] = (sym_codes[has] >> (sym_lengths[has] - 1 - j)) & 1
    return np.packbits(bits), starts


def huffman_encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """A Huffman stream (lengths, chunk offsets, bits) of ``symbols`` in ``0..alphabet-1``."""
    lengths = huffman_lengths(np.bincount(symbols, minlength=alphabet))
    packed, starts = _pack_bits(symbols, canonical_codes(lengths), lengths)
    offsets = starts[CHUNK:-1:CHUNK] if symbols.size > CHUNK else np.zeros(0, dtype=np.int64)
    return _nibbles(lengths) + offsets.astype("<u4").tobytes() + packed.tobytes()


def _nibbles(lengths: np.ndarray) -> bytes:
    padded = np.concatenate([lengths, [0] * (lengths.size % 2)]).astype(np.uint8)
    return (padded[0::2] << 4 | padded[1::2]).astype(np.uint8).tobytes()


def huffman_decode(data: bytes, count: int, alphabet: int) -> np.ndarray:
    """Decode ``count`` symbols of a :func:`huffman_encode` stream; malformed data raises EncodingError."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    chunks = -(-count // CHUNK)
    table = -(-alphabet // 2)
    head = table + 4 * (chunks - 1)
    if len(data) < head:
        raise EncodingError(f"Huffman stream of {len(data)} bytes is shorter than its {head}-byte header")
    packed_lengths = np.frombuffer(data, dtype=np.uint8, count=table).astype(np.int64)
    lengths = np.stack([packed_lengths >> 4, packed_lengths & 15], axis=1).reshape(-1)[:alphabet]
    if lengths.max() > MAX_CODE_BITS or not lengths.any():
        raise EncodingError(f"Huffman code lengths must be 1..{MAX_CODE_BITS} for at least one symbol")
    used = lengths > 0
    if np.sum(2.0 ** -lengths[used]) > 1.0 + 1e-12:
        raise EncodingError("Huffman code lengths are not a prefix code (Kraft sum above 1)")
    offsets = np.concatenate([[0], np.frombuffer(data, dtype="<u4", count=chunks - 1, offset=table)
                              .astype(np.int64)])
    payload = np.frombuffer(data, dtype=np.uint8, offset=head)
    total_bits = 8 * payload.size
    if np.any(np.diff(offsets) <= 0) or offsets[-1] >= max(total_bits, 1):
        raise EncodingError("Huffman chunk offsets are not increasing inside the stream")
    # lookup table over every MAX_CODE_BITS-bit window: the symbol whose code prefixes it, and that code's length
    codes = canonical_codes(lengths)
    table_symbol = np.full(1 << MAX_CODE_BITS, -1, dtype=np.int64)
    table_length = np.zeros(1 << MAX_CODE_BITS, dtype=np.int64)
    for symbol in np.flatnonzero(used):
        shift = MAX_CODE_BITS - int(lengths[symbol])
        first = int(codes[symbol]) << shift
        table_symbol[first:first + (1 << shift)] = symbol
        table_length[first:first + (1 << shift)] = lengths[symbol]
    padded = np.concatenate([payload, np.zeros(3, dtype=np.uint8)]).astype(np.int64)
    per_chunk = min(CHUNK, count)
    steps = np.empty((per_chunk, chunks), dtype=np.int64)  # symbol `step` of every chunk, decoded side by side
    positions = offsets.copy()
    for step in range(per_chunk):
        byte = positions >> 3
        window = (padded[byte] << 16 | padded[byte + 1] << 8 | padded[byte + 2]) >> (24 - MAX_CODE_BITS
                                                                                      - (positions & 7))
        window &= (1 << MAX_CODE_BITS) - 1
        steps[step] = table_symbol[window]
        positions = np.minimum(positions + table_length[window], total_bits)  # overruns are caught below
    out = steps.T.reshape(-1)[:count]
    if np.any(out < 0):
        raise EncodingError("Huffman stream holds a bit pattern that is no code")
    ends = _chunk_ends(offsets, lengths, out, count)
    if ends > total_bits:
        raise EncodingError(f"Huffman stream needs {ends} bits, holds {total_bits}")
    return out


def _chunk_ends(offsets: np.ndarray, lengths: np.ndarray, symbols: np.ndarray, count: int) -> int:
    """Bits the decoded symbols occupy; each chunk must end where the next begins."""
    sym_lengths = lengths[symbols]
    per_chunk = np.add.reduceat(sym_lengths, np.arange(0, count, CHUNK)) if count else np.zeros(0, dtype=np.int64)
    ends = offsets + per_chunk
    if np.any(ends[:-1] != offsets[1:]):
        raise EncodingError("Huffman chunks do not end where the next chunk begins")
    return int(ends[-1]) if ends.size else 0


# ----------------------------------------------------------------------------------------------- streams
def _bits_for(alphabet: int) -> int:
    return max(int(alphabet - 1).bit_length(), 1)


def encode_stream(symbols: np.ndarray, alphabet: int, coders: tuple[str, ...] = CODERS) -> bytes:
    """``symbols`` (0..alphabet-1, at most 256) coded by whichever of ``coders`` is shortest, behind a coder byte."""
    symbols = np.asarray(symbols, dtype=np.int64)
    width = _bits_for(alphabet)
    candidates = []
    if "packed" in coders:
        bits = ((symbols[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8)
        candidates.append(bytes([PACKED]) + np.packbits(bits.reshape(-1)).tobytes())
    if "huffman" in coders and symbols.size:
        candidates.append(bytes([HUFFMAN]) + huffman_encode(symbols, alphabet))
    raw = symbols.astype(np.uint8).tobytes()
    if "zlib" in coders:
        candidates.append(bytes([ZLIB]) + zlib.compress(raw, 9))
    if "lzma" in coders:
        candidates.append(bytes([LZMA]) + lzma.compress(raw, format=lzma.FORMAT_RAW,
                                                          filters=[{"id": lzma.FILTER_LZMA2, "preset": LZMA_PRESET}]))
    if not candidates:
        raise ValueError(f"coders must name at least one of {list(CODERS)}, got {coders!r}")
    return min(candidates, key=len)


def stream_coder(data: bytes) -> str:
    return CODERS[data[0]] if data and data[0] < len(CODERS) else "?"


def decode_stream(data: bytes, count: int, alphabet: int) -> np.ndarray:
    """The ``count`` symbols of an :func:`encode_stream` stream, each checked to be below ``alphabet``."""
    if not data:
        raise EncodingError("empty stream")
    coder, body = data[0], data[1:]
    if coder == PACKED:
        width = _bits_for(alphabet)
        if 8 * len(body) < count * width:
            raise EncodingError(f"packed stream of {len(body)} bytes is short of {count} {width}-bit symbols")
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8))[:count * width].reshape(count, width)
        symbols = bits.astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))
    elif coder == HUFFMAN:
        symbols = huffman_decode(body, count, alphabet)
    elif coder in (ZLIB, LZMA):
        try:
            raw = zlib.decompress(body) if coder == ZLIB else lzma.decompress(
                body, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": LZMA_PRESET}])
        except (zlib.error, lzma.LZMAError) as error:
            raise EncodingError(f"{CODERS[coder]} data is corrupt ({error})") from error
        if len(raw) != count:
            raise EncodingError(f"{CODERS[coder]} stream holds {len(raw)} symbols, expected {count}")
        symbols = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    else:
        raise EncodingError(f"unknown coder byte {coder}, expected one of {list(range(len(CODERS)))}")
    if symbols.size and symbols.max() >= alphabet:
        raise EncodingError(f"symbol {int(symbols.max())} outside the alphabet of {alphabet}")
    return symbols


# ----------------------------------------------------------------------------------------------- shared encoding
def _bit_view(flat: np.ndarray) -> np.ndarray:
    """The bit patterns of ``flat`` as unsigned integers (so -0.0, NaN payloads and ties compare exactly)."""
    return flat.view(np.dtype(f"u{flat.dtype.itemsize}")) if flat.dtype.kind in "fiu" else flat.astype(np.uint8)


def relative_gaps(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """The gap symbols of sorted flat ``positions``: fillers of ``2**index_bits - 1`` where a gap overflows."""
    top = (1 << index_bits) - 1
    gaps = np.diff(positions, prepend=-1) - 1
    fillers, last = np.divmod(gaps, top)
    counts = fillers + 1
    symbols = np.full(int(counts.sum()), top, dtype=np.int64)
    symbols[np.cumsum(counts) - 1] = last
    return symbols


def positions_from_gaps(symbols: np.ndarray, index_bits: int) -> np.ndarray:
    top = (1 << index_bits) - 1
    takes = symbols < top
    ends = np.cumsum(np.where(takes, symbols + 1, top))
    return ends[takes] - 1


def shared_values(array: np.ndarray, max_values: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(positions, codebook, indices)`` of the nonzero entries of ``array``, or None if they take more than
    ``max_values`` distinct values (then the tensor is not shared)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    patterns = _bit_view(flat)
    positions = np.flatnonzero(patterns)
    codebook_bits, indices = np.unique(patterns[positions], return_inverse=True)
    if codebook_bits.size > max_values:
        return None
    codebook = codebook_bits.view(flat.dtype) if flat.dtype.kind in "fiu" else codebook_bits.astype(flat.dtype)
    order = np.argsort(codebook, kind="stable")  # ascending values: neighbouring centroids get neighbouring indices
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return positions, codebook[order], rank[indices.reshape(-1)]


def encode_shared(array: np.ndarray, index_bits: int | None = None,
                  coders: tuple[str, ...] = CODERS) -> tuple[dict[str, np.ndarray], dict] | None:
    """The ``shared`` parts (codebook, gaps, indices) of ``array`` and their metadata, or None if its nonzeros
    take more than 256 values. ``index_bits`` None: the width (1..8) giving the fewest bytes."""
    found = shared_values(array)
    if found is None:
        return None
    positions, codebook, indices = found
    index_stream = encode_stream(indices, max(codebook.size, 1), coders)
    # the width is chosen by the Huffman (or packed) size, cheap to compute; then all coders compete for that width
    quick = tuple(c for c in coders if c in ("packed", "huffman")) or coders
    widths = [index_bits] if index_bits else range(1, MAX_INDEX_BITS + 1)
    bits = min(widths, key=lambda b: len(encode_stream(relative_gaps(positions, b), 1 << b, quick)))
    gaps = relative_gaps(positions, bits)
    gap_stream, n_gaps = encode_stream(gaps, 1 << bits, coders), gaps.size
    blob = codebook.tobytes() + gap_stream + index_stream
    meta = {"index_bits": bits, "values": int(codebook.size), "gaps": n_gaps, "nnz": int(positions.size),
            "bytes": [len(gap_stream), len(index_stream)],
            "coders": [stream_coder(gap_stream), stream_coder(index_stream)]}
    return {"shared": np.frombuffer(blob, dtype=np.uint8)}, meta


@dataclass(frozen=True)
class SharedWeight:
    """A shared-encoded tensor as stored, not expanded: flat ``positions`` of its nonzeros (ascending), the
    ``codebook`` and each nonzero's codebook index (``indices``)."""

    shape: tuple[int, ...]
    positions: np.ndarray
    codebook: np.ndarray
    indices: np.ndarray

    def dense(self) -> np.ndarray:
        out = np.zeros(math.prod(self.shape), dtype=self.codebook.dtype)
        out[self.positions] = self.codebook[self.indices]
        return out.reshape(self.shape)


def decode_shared(blob: np.ndarray, dtype: np.dtype, meta: dict, shape: tuple[int, ...]) -> SharedWeight:
    """The tensor of ``shape`` and ``dtype`` that :func:`encode_shared` stored in ``blob``, unexpanded;
    malformed data raises EncodingError."""
    numel = math.prod(shape)
    bits, n_values, n_gaps, nnz = (int(meta["index_bits"]), int(meta["values"]), int(meta["gaps"]),
                                   int(meta["nnz"]))
    gap_bytes, index_bytes = (int(b) for b in meta["bytes"])
    book_bytes = n_values * np.dtype(dtype).itemsize
    if not 1 <= bits <= MAX_INDEX_BITS or not 0 <= n_values <= 256 or min(gap_bytes, index_bytes) < 1 \
            or blob.ndim != 1 or blob.size != book_bytes + gap_bytes + index_bytes:
        raise EncodingError(f"index_bits {bits}, {n_values} values and streams of {gap_bytes} + {index_bytes} bytes "
                            f"do not fit the {blob.size} bytes stored")
    raw = blob.tobytes()
    codebook = np.frombuffer(raw, dtype=dtype, count=n_values)
    parts = {"gaps": raw[book_bytes:book_bytes + gap_bytes], "indices": raw[book_bytes + gap_bytes:]}
    if not 0 <= nnz <= min(numel, n_gaps) or n_gaps > numel + 1:
        raise EncodingError(f"{nnz} nonzeros in {n_gaps} gap symbols do not fit {numel} entries")
    gaps = decode_stream(parts["gaps"], n_gaps, 1 << bits)
    positions = positions_from_gaps(gaps, bits)
    if positions.size != nnz or (nnz and positions[-1] >= numel):
        raise EncodingError(f"relative indices give {positions.size} positions (last "
                            f"{int(positions[-1]) if positions.size else -1}) for {nnz} values in {numel} entries")
    indices = decode_stream(parts["indices"], nnz, max(n_values, 1))
    if nnz and n_values == 0:
        raise EncodingError("nonzeros stored with an empty codebook")
    return SharedWeight(tuple(shape), positions, codebook, indices)
