"""Two-stage queries: an approximate inner-product index gives a shortlist, exact scores rank it.

Stage one searches a FAISS index for the rows with the largest (helpful) and smallest (harmful)
approximate scores; stage two scores the union of the shortlists exactly with the `Scorer`, so
every returned score is exact and only a missed candidate can change the answer.

What is indexed. score(q, i) = g_qᵀ (H⁻¹g_i), so the index holds the preconditioned rows H⁻¹g_i
and is searched with the raw query rows g_q. Under cosine and relative normalisation each row is
divided by its H⁻¹-norm sqrt(g_iᵀH⁻¹g_i) before it is indexed (the query's own norm does not
change its ranking). The other order (index g_i, search with H⁻¹g_q) gives the same inner
products, but its IVF clusters are drawn in the unpreconditioned geometry: on the tests'
clustered rows with the raw preconditioner it recalled 0.81-0.86 of the top-10 at 16 of 76 lists
probed where this order recalled 0.86-0.98. The index therefore depends on the preconditioner.

Largest inner product is not nearest neighbour (big-norm rows win from any cluster), and an IVF
index searched by inner product misses them. Each vector x [D] is therefore indexed as
[x, sqrt(M² - |x|²)] [D + 1], M the largest |x| of the store, and searched in L2 with [q, 0]:
|q - x'|² = |q|² + M² - 2 qᵀx, so the nearest rows are exactly the largest inner products
(Bachrach et al., 2014). On the tests' clustered rows this lifts the recall@10 of IVF at 4 of 76
lists probed from 0.69 to 0.93. Vectors are padded with zeros to a multiple of 32 columns: FAISS's
SIMD distance kernels need it (at D + 1 = 1025 an IVF-SQ8 search ran 13x slower than at 1056).

The index is a file in the store: `<store>/index/<normalization>.faiss`, written durably, with a
signed JSON beside it naming its SHA-256, the store snapshot (manifest fingerprint), the
preconditioner fingerprint and the factory string. Opening it checks the
signature and the SHA-256 of the bytes read; a mismatch raises `StoreCorruptedError`. An index
built for another snapshot or preconditioner is stale and is rebuilt (the store's writer never
touches the `index/` folder). faiss-cpu is an optional extra (`pip install logra[index]`),
imported only here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from logra.curvature.saved import preconditioner_fingerprint
from logra.errors import ConfigError, StoreCorruptedError, StoreError
from logra.score import Normalization, Queries, Scorer, TopK
from logra.store.files import json_checksum, no_space, read_regular, write_atomic, write_durable

INDEX_DIR = "index"
_FORMAT = 1


def _faiss() -> ModuleType:
    try:
        import faiss  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise ConfigError(
            "two-stage queries need faiss: pip install 'logra[index]' (or pip install faiss-cpu)."
        ) from None
    return faiss


SQ8_MAX_BYTES = 2**32  # 4 GiB of 8-bit codes: above this, default_factory uses 6-bit codes
SQ6_MAX_BYTES = 2**33  # 8 GiB of 6-bit codes (10M x 1024 takes 7.4 GiB): above this, product-quantised codes.
# Measured at 10M x 1024 (benchmarks/scale.py, 1,024 lists, shortlist 100): SQ6 recalled 0.98 / 0.99 of the
# helpful / harmful top-10 at nprobe 32; SQ4 0.86 / 0.62; PQ66 (256 lists) 0.87 / 0.02-0.09. On 200k rows SQ6
# recalled what SQ8 did. PQ is kept only for stores whose 6-bit codes would not fit in memory.
MAX_LISTS = 1024  # the add step costs N x lists x D multiply-adds (one coarse assignment per row)
MIN_NPROBE = 8  # the default nprobe: a 32nd of the lists, at least this many (all of them when fewer)


def default_factory(rows: int, dim: int) -> str:
    """The FAISS factory string for `rows` rows of width `dim`: IVF over 8-bit, 6-bit or PQ codes.

    Lists: about 4·sqrt(N), at most one per 39 rows (FAISS's minimum training set) and at most
    MAX_LISTS: assigning every row to its list costs N x lists x width multiply-adds, at 10M x 1056
    1.1e13 with the cap instead of 1.3e14 at 4·sqrt(N) = 12,649 lists; searches stay cheap
    (nprobe x N / lists codes per query) and stage two re-scores exactly.
    Codes: 8-bit scalar (SQ8, one byte per column, half a bf16 store) while N x width fits in
    SQ8_MAX_BYTES; then 6-bit (SQ6, 3/4 of a byte per column) while those fit in SQ6_MAX_BYTES;
    above that PQ with one 8-bit sub-quantizer per 16 columns (width / 16 bytes a row), whose
    recall of the most harmful rows is poor (see SQ6_MAX_BYTES).
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"rows={rows!r} must be a positive int (the store's row count).")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim={dim!r} must be a positive int (the store's row width D).")
    lists = max(1, min(int(4 * math.sqrt(rows)), rows // 39, MAX_LISTS))
    width = _width(dim)
    if rows * width <= SQ8_MAX_BYTES:
        return f"IVF{lists},SQ8"
    if rows * width * 3 // 4 <= SQ6_MAX_BYTES:
        return f"IVF{lists},SQ6"
    return f"IVF{lists},PQ{width // 16}"  # width is a multiple of 32: whole 16-column blocks


def default_nprobe(lists: int) -> int:
    """Lists searched per query by default: a 32nd of them, at least MIN_NPROBE (or all, when fewer).
    At 10M rows and 1,024 lists, 32 probes recalled 0.98-0.99 of the exact top-10 in 1/10 of the
    exact streamed top-k's time (benchmarks/scale.py)."""
    return min(lists, max(MIN_NPROBE, -(-lists // 32)))


@dataclass(frozen=True)
class IndexInfo:
    """The signed description of an index file (the JSON beside it)."""

    file: str
    sha256: str
    store: str
    preconditioner: str
    normalization: str
    factory: str
    rows: int
    dim: int

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"format": _FORMAT, **self.__dict__}
        body["info_sha256"] = json_checksum(body, "info_sha256")
        return body


class InfluenceIndex:
    """A FAISS index over a store's rows, opened from the store or built (when missing or stale).

    Args:
        scorer: the exact `Scorer` (its store, preconditioner and normalisation decide the index).
        factory: a FAISS index_factory string; None: the one on disk, or `default_factory(N, D)` for
            a new index. A string other than the one on disk makes the index stale.
        directory: where the index lives; default `<store>/index`.
        rebuild: build anew even when the index on disk is current.
        seed: picks the training sample of IVF-type indexes.
        train_rows: rows sampled to train the index (clusters, codes); default 40 per IVF list
            (FAISS asks for at least 39), or 100,000 for an index without lists.
        threads: FAISS threads (None: FAISS's default).

    Attributes: path (the .faiss file), info (`IndexInfo`), built (whether this call built it).
    """

    def __init__(
        self,
        scorer: Scorer,
        *,
        factory: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        rebuild: bool = False,
        seed: int = 0,
        train_rows: int | None = None,
        threads: int | None = None,
    ) -> None:
        if not isinstance(scorer, Scorer):
            raise ConfigError(f"InfluenceIndex needs a Scorer, got {type(scorer).__name__}.")
        self._faiss = _faiss()
        if threads is not None:
            self._faiss.omp_set_num_threads(threads)
        self.scorer = scorer
        store = scorer.store
        if len(store) == 0:
            raise ConfigError(f"the store at {store.root} has no rows; there is nothing to index.")
        self.directory = Path(directory) if directory is not None else store.root / INDEX_DIR
        self.path = self.directory / f"{scorer.normalization.value}.faiss"
        self._info_path = self.path.with_suffix(".json")
        wanted = IndexInfo(
            file=self.path.name,
            sha256="",
            store=store.fingerprint,
            preconditioner=preconditioner_fingerprint(scorer.preconditioner),
            normalization=scorer.normalization.value,
            factory=factory or default_factory(len(store), store.dim),
            rows=len(store),
            dim=store.dim,
        )
        current = None if rebuild else self._current(wanted, explicit_factory=factory is not None)
        self.built = current is None
        if current is None:
            self.index, self.info = self._build(wanted, seed, train_rows)
        else:
            self.index, self.info = self._load(current), current

    # ------------------------------------------------------------ queries

    def shortlist(
        self, query_rows: Queries, size: int, nprobe: int | None = None, harmful_nprobe: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Stage one: row indices [Q, size] of the approximately largest and smallest scores.

        nprobe: IVF lists searched per query for the largest scores; harmful_nprobe: for the
        smallest (default: nprobe). None for both: the index's current setting.
        A slot FAISS could not fill (fewer rows in the probed lists) holds -1.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"shortlist size={size!r} must be a positive int.")
        probes = [self._check_nprobe(n, name) for n, name in ((nprobe, "nprobe"), (harmful_nprobe, "harmful_nprobe"))]
        ivf = _ivf(self._faiss, self.index)
        query = self.scorer.checked_queries(query_rows).to(torch.float32)  # (Q, D) raw rows g_q
        size = min(size, len(self.scorer.store))
        zero = torch.zeros(query.shape[0], _width(query.shape[1]) - query.shape[1])
        helpful_probe = probes[0] if probes[0] is not None else (ivf.nprobe if ivf is not None else None)
        found = []
        for sign, probe in ((-1.0, probes[1] or helpful_probe), (1.0, helpful_probe)):  # nprobe stays set
            if probe is not None:
                ivf.nprobe = probe
            _, rows = self.index.search(np.ascontiguousarray(torch.cat([sign * query, zero], dim=1).numpy()), size)
            found.append(torch.from_numpy(rows).long())
        return found[1], found[0]

    def _check_nprobe(self, nprobe: int | None, name: str) -> int | None:
        if nprobe is None:
            return None
        if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
            raise ConfigError(f"{name}={nprobe!r} must be a positive int (IVF lists searched per query).")
        if _ivf(self._faiss, self.index) is None:
            raise ConfigError(f"{name}={nprobe} applies to IVF indexes; {self.info.factory!r} has none: pass None.")
        return nprobe

    def top_k(
        self,
        query_rows: Queries,
        k: int = 10,
        *,
        shortlist: int | None = None,
        nprobe: int | None = None,
        harmful_nprobe: int | None = None,
    ) -> TopK:
        """Two-stage top-k: the shortlists of stage one (`shortlist` rows per query and direction,
        default 10·k) are scored exactly, over their union; the best k of those are returned.

        nprobe: IVF lists searched per query (default: `default_nprobe`, a 32nd of the lists, at least 8);
            more is slower and closer to exact.
        harmful_nprobe: lists searched for the most harmful rows (default: nprobe). Both are
            ignored by non-IVF factories. The most
            negative scores lie farther from the query than the largest, spread over more lists:
            at 10M rows (benchmarks/scale.py) the helpful top-10 lay in 2 of 1,024 lists, the
            harmful top-10 needed 15 for 0.95 of it.
        Raises ConfigError when the shortlists hold fewer than k rows.
        """
        n = len(self.scorer.store)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError(f"k={k!r} must be an int between 1 and the store's {n} rows.")
        ivf = _ivf(self._faiss, self.index)
        if ivf is not None and nprobe is None:
            nprobe = default_nprobe(ivf.nlist)
        if ivf is None:
            nprobe = harmful_nprobe = None
        helpful, harmful = self.shortlist(query_rows, shortlist or 10 * k, nprobe, harmful_nprobe)
        candidates = torch.unique(torch.cat([helpful.flatten(), harmful.flatten()]))
        candidates = candidates[candidates >= 0]
        if candidates.numel() < k:
            raise ConfigError(
                f"stage one found {candidates.numel()} candidate rows, fewer than k={k}; raise nprobe={nprobe} "
                "or the shortlist size."
            )
        exact = self.scorer.score_rows(query_rows, candidates)  # (Q, m)
        ids = self.scorer.store.ids
        out: list[tuple[Tensor, Tensor]] = []
        for largest in (True, False):
            top = exact.topk(k, dim=1, largest=largest, sorted=True)
            out.append((top.values, candidates[top.indices]))
        (hv, hi), (lv, li) = out
        helpful_ids, harmful_ids = ([[ids[j] for j in r] for r in x.tolist()] for x in (hi, li))
        return TopK(helpful_ids, hv, harmful_ids, lv, hi, li)

    # ------------------------------------------------------------ the file

    def _current(self, wanted: IndexInfo, explicit_factory: bool) -> IndexInfo | None:
        """The signed info on disk when it describes `wanted` (else None: missing or stale)."""
        if not self._info_path.exists():
            return None
        try:
            raw = json.loads(read_regular(self._info_path, 1 << 16, "index info"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(f"its info file {self._info_path.name} is not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("info_sha256") != json_checksum(raw, "info_sha256"):
            raise self._corrupt(f"its info file {self._info_path.name} fails its signature")
        raw.pop("info_sha256")
        if raw.pop("format", None) != _FORMAT:
            return None
        try:
            info = IndexInfo(**raw)
        except TypeError:
            raise self._corrupt(f"its info file {self._info_path.name} has unknown fields") from None
        same = (info.store, info.preconditioner, info.normalization, info.rows, info.dim) == (
            wanted.store,
            wanted.preconditioner,
            wanted.normalization,
            wanted.rows,
            wanted.dim,
        )
        if not same or (explicit_factory and info.factory != wanted.factory):
            return None
        return info

    def _corrupt(self, what: str) -> StoreCorruptedError:
        return StoreCorruptedError(
            f"{self.path}: the index is damaged ({what}). Delete {self.directory} or pass "
            "InfluenceIndex(..., rebuild=True) to build it again."
        )

    def _load(self, info: IndexInfo) -> Any:
        """Read the index, hashing the bytes FAISS reads; a mismatch raises StoreCorruptedError."""
        faiss, h = self._faiss, hashlib.sha256()
        try:
            with open(self.path, "rb") as f:

                def read(n: int) -> bytes:
                    block = f.read(n)
                    h.update(block)
                    return block

                index = faiss.read_index(faiss.PyCallbackIOReader(read))
                rest = f.read()
                h.update(rest)
        except FileNotFoundError:
            raise self._corrupt("the .faiss file named by its info file is missing") from None
        except RuntimeError as exc:  # FAISS could not parse the bytes
            raise self._corrupt(f"FAISS cannot read it: {str(exc).splitlines()[0]}") from None
        if h.hexdigest() != info.sha256 or rest:
            raise self._corrupt(f"its SHA-256 is {h.hexdigest()}, not the {info.sha256} it was written with")
        if index.ntotal != info.rows or index.d != _width(info.dim):
            raise self._corrupt(f"it holds {index.ntotal} rows of {index.d}, not {info.rows} of {_width(info.dim)}")
        return index

    def _build(self, wanted: IndexInfo, seed: int, train_rows: int | None) -> tuple[Any, IndexInfo]:
        """Train on a seeded sample, add every row (streamed), write the file and its signed info."""
        faiss, scorer, store = self._faiss, self.scorer, self.scorer.store
        try:
            index = faiss.index_factory(_width(store.dim), wanted.factory, faiss.METRIC_L2)
        except RuntimeError as exc:
            raise ConfigError(f"factory={wanted.factory!r} is not a FAISS index_factory string ({exc}).") from None
        top = max(float(self._vectors(chunk).norm(dim=1).max()) for _, chunk in store.iter_chunks(scorer.chunk_rows))
        if not index.is_trained:
            ivf = _ivf(faiss, index)
            n = min(len(store), max(train_rows or (40 * ivf.nlist if ivf is not None else 100_000), 1))
            sample = np.sort(np.random.default_rng(seed).choice(len(store), n, replace=False))
            index.train(_lift(self._vectors(store.take(torch.from_numpy(sample))), top))
        for _, chunk in store.iter_chunks(scorer.chunk_rows):
            index.add(_lift(self._vectors(chunk), top))
        self.directory.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()

        def write(f: Any) -> None:
            def put(block: bytes) -> None:
                h.update(block)
                f.write(block)

            faiss.write_index(index, faiss.PyCallbackIOWriter(put))

        try:
            self._info_path.unlink(missing_ok=True)  # a crash from here on leaves no info: rebuilt next time
            write_durable(self.path, write)
            info = IndexInfo(**{**wanted.__dict__, "sha256": h.hexdigest()})
            body = json.dumps(info.to_dict(), sort_keys=True, indent=1).encode()
            write_atomic(self._info_path, body)
        except OSError as exc:
            if isinstance(exc, StoreError):
                raise
            raise no_space(self.path, None, exc) from None
        return index, info

    def _vectors(self, chunk: Tensor) -> Tensor:
        """(n, D) stored rows g -> float32 (n, D) H⁻¹g, divided by sqrt(gᵀH⁻¹g) unless the score is dot."""
        x = chunk.to(torch.float32)
        pre = self.scorer.preconditioner.apply(x)
        if self.scorer.normalization is not Normalization.DOT:
            norm2 = (pre * x).sum(dim=1)
            pre = pre * torch.where(norm2 > 0, norm2.clamp_min(1e-30).rsqrt(), torch.zeros_like(norm2))[:, None]
        return pre


def _width(dim: int) -> int:
    """Index columns of D-wide rows: D + 1 (the lift), rounded up to a multiple of 32."""
    return -(-(dim + 1) // 32) * 32


def _lift(x: Tensor, top: float) -> np.ndarray:
    """(n, D) -> (n, _width(D)) float32 [x, sqrt(top² - |x|²), 0...]: inner products become L2 distances."""
    out = torch.zeros(x.shape[0], _width(x.shape[1]), dtype=torch.float32)
    out[:, : x.shape[1]] = x
    out[:, x.shape[1]] = (top**2 - (x.double() ** 2).sum(dim=1)).clamp_min(0).sqrt().to(torch.float32)
    return np.ascontiguousarray(out.numpy())


def _ivf(faiss: ModuleType, index: Any) -> Any:
    """The IVF part of `index`, or None for an index without inverted lists."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
