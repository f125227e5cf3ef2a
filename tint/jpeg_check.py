"""Find the damage in a JPEG that PIL decodes without a word.

libjpeg decodes through damaged data, filling in what it cannot read, and says so only in
warnings ("Corrupt JPEG data: bad Huffman code", "premature end of data segment", "N
extraneous bytes before marker"); Pillow does not pass them on and has no switch for them.
`jpeg_problem` finds the same conditions itself, in pure Python (no torch, no numpy), so
that `tint.imaging.open_image` can warn about the file (docs/reliability.md):

- the marker structure of every JPEG: bytes between segments, a marker that cannot be
  inside the compressed data, a file that ends without its end-of-image marker;
- for baseline (sequential Huffman) JPEGs up to `max_blocks` 8x8 blocks, every scan is
  Huffman-decoded (the codes only, not the pixels) and must hold exactly its MCUs: a code
  no table has, data that ends before the last MCU, or bytes left after it are damage.

Progressive and arithmetic-coded JPEGs, and larger baseline ones, get the marker check only.
"""

from __future__ import annotations

from pathlib import Path

MAX_BLOCKS = 60_000  # ~2 megapixels at 4:2:0; pure Python decodes ~1 s of codes per 50k blocks
_BASELINE = (0xC0, 0xC1)  # sequential Huffman frames (8 and 12 bit)
_AFTER_SCAN = {0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)}
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}


class _Corrupt(Exception):
    """What libjpeg would warn about, in words."""


def jpeg_problem(path: str | Path, max_blocks: int = MAX_BLOCKS) -> str | None:
    """'corrupt JPEG data: ...' for a JPEG with damage PIL decodes through, else None.

    `max_blocks` bounds the Huffman check (0: the marker check only). It costs ~0.1 s for a
    640x480 photo, some 40 times PIL's decoding: right for training images, which are few
    and poison a model when damaged, too slow for `tint predict`'s throughput."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        _Reader(data, max_blocks).read()
    except _Corrupt as err:
        return f"corrupt JPEG data: {err}"
    return None


class _Reader:
    """Walk the segments of one JPEG, Huffman-decoding baseline scans."""

    def __init__(self, data: bytes, max_blocks: int):
        self.data, self.max_blocks = data, max_blocks
        self.tables: dict[tuple[int, int], list[int]] = {}  # (0 DC / 1 AC, id) -> lookup
        self.frame: dict | None = None
        self.restart = 0

    def read(self) -> None:
        data, i = self.data, 2
        while i < len(data):
            if data[i] != 0xFF:
                j = data.find(b"\xff", i)
                raise _Corrupt(f"{(j if j >= 0 else len(data)) - i} extraneous bytes at byte {i}")
            while i < len(data) and data[i] == 0xFF:  # fill bytes
                i += 1
            if i >= len(data):
                break
            marker, i = data[i], i + 1
            if marker == 0xD9:
                return
            if marker in _NO_LENGTH:
                continue
            if marker == 0x00 or i + 2 > len(data):
                raise _Corrupt(f"no valid marker at byte {i - 1}")
            length = int.from_bytes(data[i:i + 2], "big")
            body, i = data[i + 2:i + length], i + length
            if len(body) != length - 2:
                raise _Corrupt("the file ends inside a header segment")
            i = self.segment(marker, body, i)
        raise _Corrupt("the file ends without an end-of-image marker")

    def segment(self, marker: int, body: bytes, i: int) -> int:
        """Take in one segment; returns where the next one starts."""
        if marker == 0xC4:
            self.huffman_tables(body)
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            self.frame = _frame(marker, body)
        elif marker == 0xDD and len(body) >= 2:
            self.restart = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            return self.scan(body, i)
        return i

    def huffman_tables(self, body: bytes) -> None:
        k = 0
        while k + 17 <= len(body):
            kind, ident, counts = body[k] >> 4, body[k] & 15, body[k + 1:k + 17]
            symbols = body[k + 17:k + 17 + sum(counts)]
            self.tables[(kind, ident)] = _lookup(counts, symbols)
            k += 17 + sum(counts)

    def scan(self, header: bytes, i: int) -> int:
        """Skip (or, for a baseline frame, check) one scan's compressed data."""
        end, restarts = _scan_data(self.data, i)
        frame = self.frame
        if frame is None or frame["marker"] not in _BASELINE or frame["height"] == 0:
            return end
        selected = [(header[1 + 2 * k], header[2 + 2 * k]) for k in range(header[0])]
        units = _scan_units(frame, selected, self.tables)
        if units is None or units[0] * len(units[1]) > self.max_blocks:
            return end
        n_mcus, blocks = units
        per_segment = self.restart or n_mcus
        expected = -(-n_mcus // per_segment)
        if len(restarts) != expected:
            raise _Corrupt(f"{len(restarts)} restart interval(s) in a scan that needs {expected}")
        for index, segment in enumerate(restarts):
            mcus = min(per_segment, n_mcus - index * per_segment)
            _decode_segment(segment.replace(b"\xff\x00", b"\xff"), mcus, blocks)
        return end


def _frame(marker: int, body: bytes) -> dict:
    if len(body) < 6 or len(body) < 6 + 3 * body[5]:
        raise _Corrupt("a frame header too short for its components")
    height, width = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big")
    components = {body[6 + 3 * k]: (body[7 + 3 * k] >> 4, body[7 + 3 * k] & 15) for k in range(body[5])}
    return {"marker": marker, "height": height, "width": width, "components": components}


def _lookup(counts: bytes, symbols: bytes) -> list[int]:
    """A 16-bit lookup table of a canonical Huffman code: peek -> (length << 8) | symbol,
    or -1 for bits that start no code."""
    table = [-1] * 65536
    code, k = 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            if k >= len(symbols) or code >= 1 << length:
                raise _Corrupt("a Huffman table with more codes than fit")
            span = 1 << (16 - length)
            table[code * span:(code + 1) * span] = [(length << 8) | symbols[k]] * span
            code, k = code + 1, k + 1
        code <<= 1
    return table


def _scan_units(frame: dict, selected: list[tuple[int, int]], tables: dict):
    """(MCUs in the scan, [(DC table, AC table) per block of one MCU]), or None when the
    scan names a component or table that is not there (left to the decoder to refuse)."""
    comps = frame["components"]
    if not selected or any(c not in comps for c, _ in selected):
        return None
    hmax = max(h for h, _ in comps.values())
    vmax = max(v for _, v in comps.values())
    blocks = []
    for c, sel in selected:
        dc, ac = tables.get((0, sel >> 4)), tables.get((1, sel & 15))
        if dc is None or ac is None:
            return None
        h, v = comps[c] if len(selected) > 1 else (1, 1)
        blocks += [(dc, ac)] * (h * v)
    if len(selected) > 1:
        n = -(-frame["width"] // (8 * hmax)) * -(-frame["height"] // (8 * vmax))
    else:  # one component: its own blocks, in its own (subsampled) size
        h, v = comps[selected[0][0]]
        width = -(-frame["width"] * h // hmax)
        height = -(-frame["height"] * v // vmax)
        n = -(-width // 8) * -(-height // 8)
    return n, blocks


def _scan_data(data: bytes, i: int) -> tuple[int, list[bytes]]:
    """Where a scan's compressed data ends (at the next marker), and its restart intervals."""
    segments, start = [], i
    while True:
        j = data.find(b"\xff", i)
        if j < 0 or j + 1 >= len(data):
            raise _Corrupt("the file ends inside the compressed image data")
        following = data[j + 1]
        if following == 0x00:
            i = j + 2
        elif following == 0xFF:
            i = j + 1
        elif 0xD0 <= following <= 0xD7:
            segments.append(data[start:j])
            start = i = j + 2
        elif following in _AFTER_SCAN:
            segments.append(data[start:j])
            return j, segments
        else:
            raise _Corrupt(f"a marker that cannot be there (0xFF{following:02X}) at byte {j}, "
                           "inside the compressed image data")


def _decode_segment(segment: bytes, mcus: int, blocks: list[tuple[list[int], list[int]]]) -> None:
    """Huffman-decode `mcus` MCUs from one restart interval; it must hold exactly them."""
    bits = len(segment) * 8
    padded = segment + b"\x00" * 8
    pos = 0

    def peek(position: int) -> int:
        byte = position >> 3
        return (int.from_bytes(padded[byte:byte + 3], "big") >> (8 - (position & 7))) & 0xFFFF

    for _ in range(mcus):
        for dc, ac in blocks:
            entry = dc[peek(pos)]
            if entry < 0:
                raise _Corrupt("bad Huffman code in the compressed image data")
            pos += (entry >> 8) + (entry & 15)
            k = 1
            while k < 64:
                entry = ac[peek(pos)]
                if entry < 0:
                    raise _Corrupt("bad Huffman code in the compressed image data")
                run_size = entry & 255
                pos += (entry >> 8) + (run_size & 15)
                if run_size & 15:
                    k += (run_size >> 4) + 1
                elif run_size >> 4 == 15:
                    k += 16
                else:
                    break
        if pos > bits:
            raise _Corrupt("premature end of data segment (the image data ends before the "
                           "last block)")
    extra = len(segment) - (-(-pos // 8))
    if extra > 0:
        raise _Corrupt(f"{extra} extraneous bytes after the last block of the image data")
