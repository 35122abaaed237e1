"""Dedup stage: one record per group of exact or near duplicate images, before any paid request.

Rule (deterministic): records are visited by descending aesthetic score (ties: input order;
records whose image cannot be read after all others, so they never displace a readable copy); a
record is dropped when it matches a record kept before it — the same sha256 (the record's own,
top level or in `meta`, else that of the file's bytes), the same URL (exact string, surrounding
whitespace ignored) or a perceptual hash (`imagehash.phash`, 64 bits) within `max_distance`
bits — and is kept otherwise. Checks run in that order; among near matches the closest kept
hash wins (ties: the higher-ranked kept record). A dropped record names the kept one in
`duplicate_of` (its `record_key`). Matching is against kept records only, so chains do not
merge: B near A (kept) is dropped, C near B but not near A stays.

Memory stays small: no record is held. Pass 1 streams the input, hashes the images in a thread
pool (or takes them from the hash cache) and keeps ~70 bytes per record (score, sha256, URL
digest, phash, flags); the grouping runs on those arrays; pass 2 reads the keys of the kept
records that others point at; pass 3 streams the input again to write the outputs. The peak is
~220 bytes per record with a full hash cache loaded (bench/bench_dedup.py).

Near duplicates are found by multi-index hashing: the 64 bits split into `max_distance + 1`
bands, and two hashes within `max_distance` bits agree exactly on one band at least
(pigeonhole), so only distinct hashes sharing a band value are compared (identical hashes are
one entry, so a thousand blank images cost nothing). The comparisons grow as about
(d+1)·n²/2^(64/(d+1)+1) for n distinct hashes: ~4·10^8 for a million at d = 4 (seconds).
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import math
import os
import sqlite3
import threading
import time
from array import array
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from groundset.core.io import atomic_write, dumps_record, iter_jsonl
from groundset.core.records import RecordError, image_path, record_key
from groundset.core.stats import drop_line, envelope, write_stats
from groundset.stages.filter.shard import strict_decoding
from groundset.stages.merge import aesthetic_score as stats_aesthetic_score

log = logging.getLogger(__name__)

KINDS = ("sha256", "url", "phash")  # duplicate kinds, in the order they are checked
# Why an image has no perceptual hash (the record is kept, deduped by sha256 and URL only).
REASONS = (
    "no_image",
    "missing_file",
    "read_error",
    "empty_file",
    "not_an_image",
    "truncated",
    "decode_error",
)
HASH_VERSION = 1  # bump when the way a phash is computed changes: older cache entries are unused
DRAFT = 64  # decode at least this many pixels a side (JPEG draft), then box-reduce to about it
MAX_DISTANCE = 32  # beyond half the bits "near" means nothing and the search is quadratic
_BATCH = 32  # images per thread-pool task
_WARN = 5  # unhashable images logged one by one, the rest counted


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 in an array."""
    return np.bitwise_count(values.astype(np.uint64, copy=False)).astype(np.int16)


# Scores are ranked at this many decimals (0-10 scale): closer ones tie and input order decides,
# so the last digits, which differ across thread counts and batches (README: Reproducibility),
# never decide which copy of an image stays.
RANK_DECIMALS = 3


def rank_score(score: float | None) -> float:
    """A record's rank key: its aesthetic score at RANK_DECIMALS, unscored ones last."""
    return -math.inf if score is None else round(score, RANK_DECIMALS)


def aesthetic_score(record: dict) -> float | None:
    """The aesthetic score (data-juicer's, as merge tiers it; else `meta.AESTHETIC_SCORE`)."""
    for score in (stats_aesthetic_score(record), (record.get("meta") or {}).get("AESTHETIC_SCORE")):
        try:
            value = float(score)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return None


def record_sha256(record: dict) -> bytes | None:
    """The sha256 img2dataset recorded (top level or in `meta`), if a valid hex digest."""
    for value in (record.get("sha256"), (record.get("meta") or {}).get("sha256")):
        if isinstance(value, str) and len(value.strip()) == 64:
            try:
                return bytes.fromhex(value.strip())
            except ValueError:
                continue
    return None


def record_url(record: dict) -> str | None:
    """The record's URL without surrounding whitespace, None when missing or empty."""
    url = record.get("url")
    return (url.strip() or None) if isinstance(url, str) else None


def _digest(text: str, size: int) -> bytes:
    """A short blake2b digest of a string."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).digest()


def url_digest(url: str | None) -> int:
    """A 64-bit digest of a URL for the cache's check (0 for no URL)."""
    return 0 if url is None else int.from_bytes(_digest(url, 8), "big") or 1


def _grayscale(img):
    """The image as 8-bit grayscale (16-bit and float images scaled, not clipped)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        pixels = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and pixels.max(initial=0) > 255):
            pixels = pixels / 257.0
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    return img.convert("L")


def image_phash(img) -> int:
    """The 64-bit perceptual hash of an open PIL image (decoded at reduced size where it can)."""
    import imagehash

    img.draft("L", (DRAFT, DRAFT))  # JPEG: decode at 1/2-1/8 scale, grayscale only
    gray = _grayscale(img)
    factor = min(gray.size) // DRAFT
    if factor >= 2:
        gray = gray.reduce(factor)
    bits = imagehash.phash(gray).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_bytes(data: bytes) -> tuple[int | None, str | None]:
    """(phash, None) of an encoded image, or (None, "reason: detail") when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return None, "empty_file: 0 bytes"
    try:
        with strict_decoding(), Image.open(io.BytesIO(data)) as img:
            return image_phash(img), None
    except UnidentifiedImageError:
        return None, "not_an_image: PIL cannot identify the image format"
    except Exception as err:  # noqa: BLE001 (any decoder error makes the image unhashable)
        kind = "truncated" if "truncated" in str(err) else "decode_error"
        return None, f"{kind}: {type(err).__name__}: {err}"


def _reason_code(reason: str | None) -> int:
    """1 + the index of a reason's kind in REASONS, 0 for none."""
    if reason is None:
        return 0
    kind = reason.split(":", 1)[0]
    return REASONS.index(kind) + 1 if kind in REASONS else REASONS.index("decode_error") + 1


# --- hash cache ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hashed:
    """What hashing one record's image gave (sha256 of the file, phash, why none)."""

    sha256: bytes | None
    phash: int | None
    reason: str | None
    cached: bool = False  # found in the cache (not read)
    read: bool = False  # read and decoded in this run
    entry: dict | None = None  # the new cache entry, if any


class HashCache:
    """SQLite table of computed hashes keyed by image path, valid while the file's size,
    mtime_ns (and URL, where both have one) are unchanged and its version is HASH_VERSION.

    Lookups run in the hashing threads, each on its own read connection (WAL mode: they read
    while the main thread writes); new entries are committed batch by batch, so a killed job
    keeps what it hashed and leaves no torn entry.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_CACHE_TABLE)
            self.stale = self._db.execute(
                "SELECT COUNT(*) FROM hashes WHERE v != ?", (HASH_VERSION,)
            ).fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise RuntimeError(
                f"{self.path}: not a groundset hash cache ({err}); remove it to hash afresh"
            ) from err
        self._readers: list[sqlite3.Connection] = []

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM hashes").fetchone()[0]

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, check_same_thread=False)
            self._local.db = db
            self._readers.append(db)
        return db

    def lookup(self, path: str, size: int, mtime_ns: int, url: str | None) -> Hashed | None:
        """The cached hashes of a file, if its entry still matches (from any thread)."""
        row = (
            self._reader()
            .execute(
                "SELECT size, mtime_ns, url, sha256, phash, error FROM hashes WHERE path = ? AND v = ?",
                (path, HASH_VERSION),
            )
            .fetchone()
        )
        if row is None:
            return None
        cached_size, cached_mtime, cached_url, sha, phash, error = row
        if (
            cached_size != size
            or cached_mtime != mtime_ns
            or (url and cached_url and url != cached_url)
        ):
            return None
        if phash is None:
            return Hashed(bytes(sha), None, error or "decode_error", cached=True)
        return Hashed(bytes(sha), int(phash, 16), None, cached=True)

    def append(self, entries: list[dict]) -> None:
        """Store new entries (one transaction: all of them or, killed, none)."""
        if not entries:
            return
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(e["path"], e["size"], e["mtime_ns"], e["url"], bytes.fromhex(e["sha256"]),
                  e["phash"], e["error"], e["v"]) for e in entries],
            )  # fmt: skip

    def close(self) -> None:
        """Close every connection (the entries are committed already)."""
        for db in self._readers:
            db.close()
        self._readers.clear()
        self._db.close()

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CACHE_TABLE = """CREATE TABLE IF NOT EXISTS hashes (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, url TEXT, sha256 BLOB,
    phash TEXT, error TEXT, v INTEGER)"""


def hash_file(path: str | None, url: str | None = None, cache: HashCache | None = None) -> Hashed:
    """sha256 and phash of an image file (from the cache when its entry matches); never raises."""
    if path is None:
        return Hashed(None, None, "no_image: the record names no image")
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            if cache is not None:
                hit = cache.lookup(path, stat.st_size, stat.st_mtime_ns, url)
                if hit is not None:
                    return hit
            data = handle.read()
    except FileNotFoundError:
        return Hashed(None, None, "missing_file: not found")
    except OSError as err:
        return Hashed(None, None, f"read_error: {type(err).__name__}: {err}")
    sha = hashlib.sha256(data).digest()
    phash, reason = phash_bytes(data)
    entry = {
        "path": path,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "url": url,
        "sha256": sha.hex(),
        "phash": f"{phash:016x}" if phash is not None else None,
        "error": reason,
        "v": HASH_VERSION,
    }
    return Hashed(sha, phash, reason, read=True, entry=entry)


def _hash_batch(jobs: list[tuple[str | None, str | None]], cache: HashCache | None) -> list[Hashed]:
    """Hash a batch of (image path, URL) in a worker thread."""
    return [hash_file(path, url, cache) for path, url in jobs]


# --- grouping -----------------------------------------------------------------------------


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of the `max_distance + 1` bands the 64 hash bits split into."""
    count = max_distance + 1
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    out, shift = [], 0
    for width in widths:
        out.append((shift, (1 << width) - 1))
        shift += width
    return out


def near_pairs(
    hashes: np.ndarray, max_distance: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pairs (i < j) of distinct hashes within `max_distance` bits: (i, j, distance, candidates
    compared). Multi-index hashing: only hashes that share one band's value are compared."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    empty = np.zeros(0, dtype=np.int64)
    if max_distance <= 0 or n < 2:
        return empty, empty, np.zeros(0, dtype=np.int16), 0
    found_a, found_b, found_d, compared = [], [], [], 0
    positions = np.arange(n)
    for shift, mask in bands(max_distance):
        keys = (hashes >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], n]
        run_end = np.repeat(ends, ends - starts)  # for each sorted position, the end of its run
        sorted_hashes = hashes[order]
        offset = 1
        active = positions[run_end - positions > offset]
        while active.size:  # compare each hash with the one `offset` further in its run
            partner = active + offset
            dist = np.bitwise_count(sorted_hashes[active] ^ sorted_hashes[partner])
            near = np.flatnonzero(dist <= max_distance)
            compared += active.size
            if near.size:
                a, b = order[active[near]], order[partner[near]]
                found_a.append(np.minimum(a, b))
                found_b.append(np.maximum(a, b))
                found_d.append(dist[near].astype(np.int16))
            offset += 1
            active = active[run_end[active] > partner + 1]
    if not found_a:
        return empty, empty, np.zeros(0, dtype=np.int16), compared
    a, b, d = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_d)
    _, first = np.unique(a * n + b, return_index=True)  # a pair found in several bands
    return a[first], b[first], d[first], compared


def group_ids(columns: list[np.ndarray], valid: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense ids of equal rows over `columns` (-1 where not valid), and how many ids."""
    ids = np.full(len(valid), -1, dtype=np.int32)
    rows = np.flatnonzero(valid)
    if not rows.size:
        return ids, 0
    cols = [column[rows] for column in columns]
    order = np.lexsort(cols[::-1])
    change = np.zeros(len(rows) - 1, dtype=bool)
    for column in cols:
        ordered = column[order]
        change |= ordered[1:] != ordered[:-1]
    sorted_ids = np.r_[0, np.cumsum(change)].astype(np.int32)
    ids[rows[order]] = sorted_ids
    return ids, int(sorted_ids[-1]) + 1


def _shared(ids: np.ndarray) -> np.ndarray:
    """Whether each record's id (-1: none) is held by another record too."""
    counts = np.bincount(ids[ids >= 0], minlength=1)
    return (ids >= 0) & (counts[np.maximum(ids, 0)] > 1)


@dataclass
class Clusters:
    """The grouping's verdict per record (input order): kept or the duplicate of which."""

    duplicate_of: np.ndarray  # ordinal of the kept record, -1 when kept
    kind: np.ndarray  # 1 + index in KINDS, 0 when kept
    distance: np.ndarray  # phash bits between the two (-1 when either has no phash)
    near_pairs: int
    compared: int


def _neighbours(
    a: np.ndarray, b: np.ndarray, dist: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The near pairs as neighbours of each distinct phash (CSR, both directions): (indptr,
    neighbour, distance)."""
    src, dst, ndist = np.r_[a, b], np.r_[b, a], np.r_[dist, dist]
    by_src = np.argsort(src, kind="stable")
    nbr = dst[by_src].astype(np.int32)
    nbr_dist = ndist[by_src].astype(np.int32)
    indptr = np.r_[0, np.cumsum(np.bincount(src, minlength=count))].astype(np.int64)
    return indptr, nbr, nbr_dist


def _contested(
    sha_id: np.ndarray, url_id: np.ndarray, phash_id: np.ndarray, indptr: np.ndarray
) -> np.ndarray:
    """Whether each record shares a key with another or has a near hash: the others are kept
    and match nobody."""
    contested = _shared(sha_id) | _shared(url_id) | _shared(phash_id)
    with_phash = phash_id >= 0
    contested[with_phash] |= np.diff(indptr)[phash_id[with_phash]] > 0
    return contested


def _slots(ids: np.ndarray) -> np.ndarray:
    """Per id, the rank (position in `order`) of its kept record, -1 for none yet."""
    return np.full(int(ids.max(initial=-1)) + 1, -1, dtype=np.int32)


def _phash_match(hi: int, rank: int, kh: memoryview, ip: memoryview, nb: memoryview,
                 nd: memoryview) -> int:  # fmt: skip
    """The rank of the kept record phash `hi` matches (equal, else the closest near one; ties:
    the higher-ranked), or -1 after keeping it as phash `hi`'s record."""
    if kh[hi] >= 0:
        return kh[hi]
    best = None
    for j in range(ip[hi], ip[hi + 1]):
        target = kh[nb[j]]
        if target >= 0 and (best is None or (nd[j], target) < best):
            best = (nd[j], target)
    if best is not None:
        return best[1]
    kh[hi] = rank
    return -1


def _greedy(
    order: np.ndarray,
    ranks: np.ndarray,
    ids: tuple[np.ndarray, np.ndarray, np.ndarray],
    graph: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The greedy rule's visit of the contested `ranks`: per record (input order), the rank of
    the kept record it duplicates (-1 when kept) and the kind (1 + index in KINDS, 0 kept)."""
    n = len(order)
    kept_sha, kept_url, kept_phash = map(_slots, ids)
    dup_rank = np.full(n, -1, dtype=np.int32)
    kind = np.zeros(n, dtype=np.int8)
    # memoryviews: fast scalar access from Python without a Python object per record
    o, s, u, h = map(memoryview, (order, *ids))
    ks, ku, kh, dr, kd = map(memoryview, (kept_sha, kept_url, kept_phash, dup_rank, kind))
    ip, nb, nd = map(memoryview, graph)
    for rank in memoryview(ranks):
        i = o[rank]
        si, ui, hi = s[i], u[i], h[i]
        if si >= 0 and ks[si] >= 0:
            dr[i], kd[i] = ks[si], 1
        elif ui >= 0 and ku[ui] >= 0:
            dr[i], kd[i] = ku[ui], 2
        elif hi >= 0:
            dr[i] = _phash_match(hi, rank, kh, ip, nb, nd)
            kd[i] = 3 if dr[i] >= 0 else 0
        # its bytes and URL now lead to its group's kept record (a dropped record's too: the
        # same URL listed again is a `url` duplicate, whichever copy was dropped first)
        target = rank if dr[i] < 0 else dr[i]
        if si >= 0 and ks[si] < 0:
            ks[si] = target
        if ui >= 0 and ku[ui] < 0:
            ku[ui] = target
    return dup_rank, kind


def _distances(duplicate_of: np.ndarray, phash_id: np.ndarray, phashes: np.ndarray) -> np.ndarray:
    """Phash bits between each duplicate and its kept record (-1 when either has no phash)."""
    distance = np.full(len(duplicate_of), -1, dtype=np.int16)
    both = (duplicate_of >= 0) & (phash_id >= 0)
    both[both] &= phash_id[duplicate_of[both]] >= 0
    rows = np.flatnonzero(both)
    distance[rows] = popcount(phashes[phash_id[rows]] ^ phashes[phash_id[duplicate_of[rows]]])
    return distance


def cluster(
    score: np.ndarray,
    sha_id: np.ndarray,
    url_id: np.ndarray,
    phash_id: np.ndarray,
    phashes: np.ndarray,
    max_distance: int,
) -> Clusters:
    """The greedy rule over compact arrays: visit by descending score (ties: input order), drop
    a record matching a kept one (same sha id, same URL id, phash within `max_distance`) or
    sharing bytes or URL with a dropped one (then the duplicate of that one's kept record)."""
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable").astype(np.int32)
    a, b, dist, compared = near_pairs(phashes, max_distance)
    graph = _neighbours(a, b, dist, len(phashes))
    contested = _contested(sha_id, url_id, phash_id, graph[0])
    ranks = np.flatnonzero(contested[order])
    dup_rank, kind = _greedy(order, ranks, (sha_id, url_id, phash_id), graph)
    duplicate_of = np.where(dup_rank >= 0, order[np.maximum(dup_rank, 0)], -1).astype(np.int32)
    distance = _distances(duplicate_of, phash_id, phashes)
    return Clusters(duplicate_of, kind, distance, len(a), compared)


# --- the stage ----------------------------------------------------------------------------


@dataclass
class _Columns:
    """Pass 1's compact per-record columns (input order)."""

    score: array
    sha: bytearray
    has_sha: array
    url: bytearray
    has_url: array
    phash: array
    reason: array


def _hash_pass(
    input: str | os.PathLike, threads: int, cache: HashCache | None, counts: Counter
) -> tuple[_Columns, dict[str, int]]:
    """Pass 1: stream the records, hash their images in a thread pool, keep compact columns."""
    cols = _Columns(
        array("d"), bytearray(), array("b"), bytearray(), array("b"), array("Q"), array("b")
    )
    pending: collections.deque[tuple[Future, list[bytes | None]]] = collections.deque()
    reasons: Counter = Counter()

    def consume() -> None:
        """Take the oldest batch's hashes into the columns (input order)."""
        future, own_shas = pending.popleft()
        new_entries = []
        for hashed, own in zip(future.result(), own_shas, strict=True):
            sha = own or hashed.sha256
            cols.sha += sha or bytes(32)
            cols.has_sha.append(sha is not None)
            cols.phash.append(hashed.phash or 0)
            cols.reason.append(_reason_code(hashed.reason))
            counts["hashed"] += hashed.read
            counts["hash_cache_hits"] += hashed.cached
            if hashed.entry is not None:
                new_entries.append(hashed.entry)
            if hashed.reason is not None:
                reasons[hashed.reason.split(":", 1)[0]] += 1
                if sum(reasons.values()) <= _WARN:
                    log.warning("unhashable image (kept, deduped by sha256/URL): %s", hashed.reason)
        if cache is not None:
            cache.append(new_entries)
        bar.update(len(own_shas))

    with (
        strict_decoding(),
        ThreadPoolExecutor(max(1, threads)) as pool,
        tqdm(unit="img", desc="dedup hash", mininterval=5) as bar,
    ):
        jobs: list[tuple[str | None, str | None]] = []
        own: list[bytes | None] = []
        for record in iter_jsonl(input):
            try:
                path: str | None = image_path(record)
            except RecordError:
                path = None
            url = record_url(record)
            cols.score.append(rank_score(aesthetic_score(record)))
            cols.url += _digest(url, 16) if url is not None else bytes(16)
            cols.has_url.append(url is not None)
            jobs.append((path, url))
            own.append(record_sha256(record))
            if len(jobs) == _BATCH:
                pending.append((pool.submit(_hash_batch, jobs, cache), own))
                jobs, own = [], []
                while len(pending) > 2 * max(1, threads):  # bounded: memory stays flat
                    consume()
        if jobs:
            pending.append((pool.submit(_hash_batch, jobs, cache), own))
        while pending:
            consume()
    return cols, dict(sorted(reasons.items()))


@dataclass
class _Hashes:
    """Per record (input order), the hashes pass 3 writes into the records."""

    sha: np.ndarray  # (n, 32) uint8 digests
    has_sha: np.ndarray
    phash: np.ndarray  # uint64
    reason: np.ndarray  # 0: hashed, else 1 + the index of why not in REASONS


def _group(cols: _Columns, max_distance: int) -> tuple[_Hashes, Clusters, int]:
    """Dense ids of equal sha256, URL and phash, then the greedy rule; also the distinct
    phashes' count. Only the hashes written later outlive the call."""
    n = len(cols.score)
    sha = np.frombuffer(cols.sha, dtype=np.uint8).reshape(n, 32)
    has_sha = np.frombuffer(cols.has_sha, dtype=np.int8).astype(bool)
    sha_id, _ = group_ids(
        [sha[:, 8 * k : 8 * k + 8].copy().view(">u8").ravel() for k in range(4)], has_sha
    )
    url = np.frombuffer(cols.url, dtype=">u8").reshape(n, 2)
    url_id, _ = group_ids([url[:, 0], url[:, 1]], np.frombuffer(cols.has_url, dtype=np.int8) > 0)
    reason = np.frombuffer(cols.reason, dtype=np.int8)
    phash = np.frombuffer(cols.phash, dtype=np.uint64)
    has_phash = reason == 0
    phashes, inverse = np.unique(phash[has_phash], return_inverse=True)
    phash_id = np.full(n, -1, dtype=np.int32)
    phash_id[has_phash] = inverse.ravel()
    score = np.frombuffer(cols.score, dtype=np.float64)
    # a record whose image cannot be read ranks after every readable one: it never stays in
    # place of a readable copy (same URL or bytes), which would lose the image for captioning
    order = np.lexsort((np.arange(n), -np.nan_to_num(score, nan=-np.inf), ~has_phash))
    rank = np.empty(n, dtype=np.float64)
    rank[order] = -np.arange(n, dtype=np.float64)  # cluster visits by descending rank
    groups = cluster(rank, sha_id, url_id, phash_id, phashes, max_distance)
    return _Hashes(sha, has_sha, phash, reason), groups, len(phashes)


def _target_keys(input: str | os.PathLike, targets: np.ndarray, records: int) -> dict[int, str]:
    """Pass 2: the keys of the kept records that dropped ones point at."""
    wanted = np.zeros(records, dtype=bool)
    wanted[targets] = True
    keys, count = {}, 0
    for ordinal, record in enumerate(iter_jsonl(input)):
        if ordinal < records and wanted[ordinal]:
            keys[ordinal] = record_key(record)
        count += 1
    if count != records:
        raise RuntimeError(f"{input} changed during dedup ({records} records, now {count})")
    return keys


def _empty_stats(max_distance: int, enabled: bool) -> dict:
    """The stats counts with every count at zero (`records_in`, `kept`, `dropped_by_kind`: the
    envelope's, see `_envelope`)."""
    return {
        "enabled": enabled,
        "max_distance": max_distance,
        "records_in": 0,
        "kept": 0,
        "dropped_by_kind": dict.fromkeys(KINDS, 0),
        "unhashable": 0,
        "unhashable_by_reason": {},
        "hashed": 0,
        "hash_cache_hits": 0,
        "hash_cache_stale": 0,
        "distinct_phashes": 0,
        "near_pairs": 0,
        "near_candidates_compared": 0,
        "seconds": 0.0,
        "seconds_by_step": {"hash": 0.0, "group": 0.0, "write": 0.0},
    }


def _envelope(counts: dict) -> dict:
    """Dedup's stats envelope: duplicates by kind dropped, the other counts as extras."""
    extras = {k: v for k, v in counts.items() if k not in ("records_in", "kept", "dropped_by_kind")}
    return envelope(
        "dedup", counts["records_in"], counts["kept"], counts["dropped_by_kind"], **extras
    )


def _copy_through(input: str | os.PathLike, output, dropped, stats: dict) -> None:
    """Dedup disabled: every record is kept as it is."""
    with atomic_write(output) as out, atomic_write(dropped):
        for record in iter_jsonl(input):
            out.write(dumps_record(record) + "\n")
            stats["records_in"] += 1
    stats["kept"] = stats["records_in"]


def _duplicate_line(record: dict, groups: Clusters, ordinal: int, target: str) -> dict:
    """The drop line of a duplicate: its kind as the reason, the kept record it repeats."""
    kind = KINDS[groups.kind[ordinal] - 1]
    distance = int(groups.distance[ordinal])
    record.update(
        duplicate_of=target,
        duplicate_kind=kind,
        phash_distance=distance if distance >= 0 else None,
    )
    return drop_line(record, "dedup", kind, f"{kind} duplicate of {target}")


def _hash_with_cache(
    input: str | os.PathLike, threads: int, cache: str | os.PathLike | None, counts: Counter
) -> tuple[_Columns, dict[str, int]]:
    """Pass 1 with the hash cache at `cache` (if any) open around it; its stale count noted."""
    hash_cache = HashCache(cache) if cache is not None else None
    try:
        return _hash_pass(input, threads, hash_cache, counts)
    finally:
        if hash_cache is not None:
            hash_cache.close()
            counts["hash_cache_stale"] = hash_cache.stale


def _annotate(record: dict, ordinal: int, hashes: _Hashes) -> None:
    """Write a record's hashes into it: its sha256 (unless it has one), phash or why none."""
    if hashes.has_sha[ordinal]:
        record.setdefault("sha256", hashes.sha[ordinal].tobytes().hex())
    if hashes.reason[ordinal] == 0:
        record["phash"] = f"{int(hashes.phash[ordinal]):016x}"
        record.pop("phash_error", None)  # an earlier run's
    else:
        record["phash_error"] = REASONS[hashes.reason[ordinal] - 1]
        record.pop("phash", None)


def _write_pass(
    input: str | os.PathLike,
    output: str | os.PathLike,
    dropped: str | os.PathLike,
    hashes: _Hashes,
    groups: Clusters,
) -> None:
    """Passes 2 and 3: the kept records to `output`, the duplicates' drop lines to `dropped`."""
    n = len(hashes.reason)
    targets = np.unique(groups.duplicate_of[groups.duplicate_of >= 0])
    keys = _target_keys(input, targets, n) if targets.size else {}
    written = 0
    with atomic_write(output) as out, atomic_write(dropped) as bad:
        for ordinal, record in enumerate(iter_jsonl(input)):
            if ordinal >= n:
                raise RuntimeError(f"{input} changed during dedup (more than {n} records)")
            written += 1
            _annotate(record, ordinal, hashes)
            target = int(groups.duplicate_of[ordinal])
            if target < 0:
                out.write(dumps_record(record) + "\n")
                continue
            bad.write(dumps_record(_duplicate_line(record, groups, ordinal, keys[target])) + "\n")
        if written != n:
            raise RuntimeError(f"{input} changed during dedup ({n} records, now {written})")


def _counts(
    hashes: _Hashes,
    groups: Clusters,
    reasons: dict[str, int],
    counts: Counter,
    distinct: int,
    times: tuple[float, float, float, float],
) -> dict:
    """The stats counts of a run (see `_empty_stats`) from its verdicts and step times (start,
    hashed, grouped, done)."""
    n = len(hashes.reason)
    kept_mask = groups.duplicate_of < 0
    kinds = Counter(groups.kind[~kept_mask].tolist())
    start, hashed_at, grouped_at, done = times
    return dict(
        records_in=n,
        kept=int(kept_mask.sum()),
        dropped_by_kind={name: kinds.get(k + 1, 0) for k, name in enumerate(KINDS)},
        unhashable=int(n - (hashes.reason == 0).sum()),
        unhashable_by_reason=reasons,
        hashed=counts["hashed"],
        hash_cache_hits=counts["hash_cache_hits"],
        hash_cache_stale=counts["hash_cache_stale"],
        distinct_phashes=distinct,
        near_pairs=groups.near_pairs,
        near_candidates_compared=groups.compared,
        seconds=round(done - start, 3),
        seconds_by_step={
            "hash": round(hashed_at - start, 3),
            "group": round(grouped_at - hashed_at, 3),
            "write": round(done - grouped_at, 3),
        },
    )


def dedup_records(
    input: str | os.PathLike,
    output: str | os.PathLike,
    dropped: str | os.PathLike,
    stats: str | os.PathLike,
    max_distance: int = 4,
    enabled: bool = True,
    threads: int = 2,
    cache: str | os.PathLike | None = None,
) -> dict:
    """Write one record per group of duplicates to `output` (input order), the others to
    `dropped` (with `duplicate_of`), the counts to `stats`; return the counts."""
    if not isinstance(max_distance, int) or not 0 <= max_distance <= MAX_DISTANCE:
        raise ValueError(f"max_distance must be an integer in 0..{MAX_DISTANCE}: {max_distance!r}")
    start = time.perf_counter()
    result = _empty_stats(max_distance, enabled)
    if not enabled:
        _copy_through(input, output, dropped, result)
        result["seconds"] = round(time.perf_counter() - start, 3)
        result = _envelope(result)
        write_stats(stats, result)
        return result

    counts: Counter = Counter()
    cols, reasons = _hash_with_cache(input, threads, cache, counts)
    hashed_at = time.perf_counter()
    hashes, groups, distinct = _group(cols, max_distance)
    del cols  # what grouping alone needed (scores, URL digests)
    grouped_at = time.perf_counter()
    _write_pass(input, output, dropped, hashes, groups)
    times = (start, hashed_at, grouped_at, time.perf_counter())
    result.update(_counts(hashes, groups, reasons, counts, distinct, times))
    result = _envelope(result)
    write_stats(stats, result)
    log.info(
        "dedup: %d records, %d kept, dropped %s, %d unhashable",
        result["records_in"],
        result["records_out"],
        result["dropped"],
        result["unhashable"],
    )
    return result
