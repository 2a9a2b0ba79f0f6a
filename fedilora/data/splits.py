"""Who holds which sample, and which modality each training sample has lost.

The splits are a table, not a copy of the data: one row per (seed, sample, assignment) with
``seed``, ``row`` (dataset index), ``client`` (-1 for the global test set), ``split``
('train'|'test'), ``has_image`` and ``has_text``. They are computed once per seed (``seed`` and
``compare.seeds``) and saved, so every stage and every method sees exactly the same clients.

Randomness: the seed is spawned into independent streams (global test, partition, client
train/test, missing modalities). Changing e.g. ``missing.rate`` therefore leaves the partition
untouched, and the comparison between runs isolates the knob that changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedilora.atomic import atomic_path
from fedilora.config import Params
from fedilora.data.records import DatasetError

COLUMNS = ("seed", "row", "client", "split", "has_image", "has_text")
GLOBAL_TEST = -1
PUBLIC = -2  # the public slice (data.public_fraction): no client holds it; the alignment stage trains on it
MIN_DIRICHLET_CLIENT_SIZE = 2
MAX_DIRICHLET_TRIES = 1000


class SplitsError(ValueError):
    """A splits file that cannot be used; the message names the file."""


# --------------------------------------------------------------------------- partition


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to ``weights`` summing exactly to ``total``."""
    raw = weights / weights.sum() * total
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a test set whose class proportions follow the whole dataset's."""
    classes, sizes = np.unique(labels, return_counts=True)
    per_class = _largest_remainder(sizes.astype(float), int(round(fraction * len(labels))))
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per_class)
    ]
    return np.sort(np.concatenate(picked)).astype(int)


def _iid(pool: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(pool), num_clients)]


def _dirichlet_once(
    pool: np.ndarray, labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels[pool]):
        idx = rng.permutation(pool[labels[pool] == c])
        cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
        for k, part in enumerate(np.split(idx, cuts)):
            shares[k].append(part)
    return [np.sort(np.concatenate(s)).astype(int) for s in shares]


def _dirichlet(
    pool: np.ndarray, labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew; resampled because a client with almost no data can neither train nor test."""
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_once(pool, labels, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= MIN_DIRICHLET_CLIENT_SIZE:
            return parts
    raise ValueError(
        f"dirichlet partition: no draw in {MAX_DIRICHLET_TRIES} tries gave every one of "
        f"clients.num_clients={num_clients} clients at least {MIN_DIRICHLET_CLIENT_SIZE} of the "
        f"{len(pool)} samples (clients.dirichlet_alpha={alpha}); raise the alpha or use fewer clients"
    )


def _check_sizes(n_total: int, n_pool: int, params: Params) -> None:
    k = params.clients.num_clients
    per_client = MIN_DIRICHLET_CLIENT_SIZE if params.clients.partition == "dirichlet" else 1
    if n_pool < k * per_client:
        raise ValueError(
            f"clients.num_clients={k} is too many for {n_pool} client samples "
            f"({n_total} samples minus the global test set); a {params.clients.partition} "
            f"partition needs at least {per_client} per client, {k * per_client} in all"
        )


# --------------------------------------------------------------------------- can it train?


def _hot(labels: np.ndarray) -> np.ndarray:
    """(N, C) bool: which classes each row has (class ids or multi-hot rows)."""
    if labels.ndim == 2:
        return labels > 0
    return labels[:, None] == np.arange(int(labels.max()) + 1 if len(labels) else 0)[None, :]


def untested_classes(labels: np.ndarray, test: np.ndarray) -> list[int]:
    """Classes that some training row has and no test row has: they would be learnt but never
    evaluated (and their test accuracy would be silently absent)."""
    hot, test = _hot(np.asarray(labels)), np.asarray(test, dtype=bool)
    return np.flatnonzero(hot[~test].any(0) & ~hot[test].any(0)).tolist()


def _named(classes: list[int], names: Sequence[str] | None) -> str:
    shown = [names[c] if names is not None and c < len(names) else c for c in classes[:10]]
    return f"{shown}" + (f" and {len(classes) - 10} more" if len(classes) > 10 else "")


def check_official_test(labels: np.ndarray, test: np.ndarray, names: Sequence[str] | None = None) -> None:
    """An official test split must leave rows for training and test every class trained on."""
    test = np.asarray(test, dtype=bool)
    if test.all():
        raise DatasetError("every row is in the official test split; the clients need rows marked 'train'")
    missing = untested_classes(labels, test)
    if missing:
        raise DatasetError(
            f"the official test split holds no sample of class(es) {_named(missing, names)} seen in training; "
            "every class the clients train on needs at least one test sample"
        )


def _check_holdout(labels: np.ndarray, test: np.ndarray, fraction: float, names: Sequence[str] | None) -> None:
    """A stratified holdout can only test every class if it has room for one sample of each."""
    hot = _hot(labels)
    present = int(hot.any(0).sum())
    if labels.ndim == 1 and present > len(test):  # (a multi-label row can stand for several)
        raise DatasetError(
            f"{present} classes, but data.test_fraction={fraction} holds out {len(test)} of {len(labels)} samples; "
            "the global test set needs at least one sample of every class: raise data.test_fraction or add samples"
        )
    in_test = np.zeros(len(labels), dtype=bool)
    in_test[test] = True
    missing = untested_classes(labels, in_test)
    if missing:
        counts = hot.sum(0)
        raise DatasetError(
            f"data.test_fraction={fraction} holds out no sample of class(es) {_named(missing, names)} "
            f"(with {sorted({int(counts[c]) for c in missing})} samples); every class needs at least one test sample: "
            "add samples of them or raise data.test_fraction"
        )


# --------------------------------------------------------------------------- per client


def _client_test_size(n: int, fraction: float) -> int:
    """At least one train sample always; at least one test sample whenever there are two."""
    if n < 2:
        return 0
    return min(n - 1, max(1, int(round(fraction * n))))


def _missing_masks(
    n_train: int, rate: float, pattern: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly round(rate * n) samples lose one modality; never both, so no sample is empty."""
    has_image = np.ones(n_train, dtype=bool)
    has_text = np.ones(n_train, dtype=bool)
    affected = rng.choice(n_train, size=int(round(rate * n_train)), replace=False)
    if pattern == "image":
        has_image[affected] = False
    elif pattern == "text":
        has_text[affected] = False
    elif pattern == "both":
        loses_image = rng.random(len(affected)) < 0.5
        has_image[affected[loses_image]] = False
        has_text[affected[~loses_image]] = False
    else:
        raise ValueError(f"missing.pattern must be image, text or both, got {pattern!r}")
    return has_image, has_text


def _frame(rows: np.ndarray, client: int, split: str, has_image: np.ndarray, has_text: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row": rows.astype(np.int64),
            "client": np.full(len(rows), client, dtype=np.int64),
            "split": [split] * len(rows),
            "has_image": has_image,
            "has_text": has_text,
        }
    )


def _complete(rows: np.ndarray, client: int, split: str) -> pd.DataFrame:
    ones = np.ones(len(rows), dtype=bool)
    return _frame(rows, client, split, ones, ones)


def _client_frames(
    k: int, share: np.ndarray, params: Params, split_rng: np.random.Generator, miss_rng: np.random.Generator
) -> list[pd.DataFrame]:
    shuffled = split_rng.permutation(share)
    n_test = _client_test_size(len(shuffled), params.clients.test_fraction)
    test, train = np.sort(shuffled[:n_test]), np.sort(shuffled[n_test:])
    rate, pattern = params.client_missing()[k]
    has_image, has_text = _missing_masks(len(train), rate, pattern, miss_rng)
    return [_frame(train, k, "train", has_image, has_text), _complete(test, k, "test")]


def representative_labels(multi_hot: np.ndarray) -> np.ndarray:
    """One class id per multi-label row, for stratifying and Dirichlet partitioning: its rarest
    label (so rare classes still spread over the test set and the clients); rows without any
    label get the extra id C."""
    multi_hot = np.asarray(multi_hot) > 0
    frequency = multi_hot.sum(0)
    rank = np.where(multi_hot, frequency[None, :], np.iinfo(np.int64).max)
    return np.where(multi_hot.any(1), rank.argmin(1), multi_hot.shape[1]).astype(np.int64)


def public_rows(labels: np.ndarray, params: Params, official_test: np.ndarray | None = None) -> np.ndarray:
    """The public slice's rows: a stratified ``data.public_fraction`` of the rows outside an
    official test split, drawn with ``data.public_seed`` (empty without a public slice)."""
    if params.data.public_fraction == 0:
        return np.zeros(0, dtype=int)
    candidates = np.arange(len(labels)) if official_test is None else np.flatnonzero(~official_test)
    rng = np.random.default_rng(np.random.SeedSequence(params.data.public_seed).spawn(5)[4])
    return np.sort(candidates[_stratified_holdout(labels[candidates], params.data.public_fraction, rng)])


def make_splits(
    labels: Sequence[int] | np.ndarray,
    params: Params,
    test_rows: Sequence[bool] | None = None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Global test set, client partition, client train/test and missing modalities, all seeded.

    ``labels``: class ids (N,), or multi-hot rows (N, C), partitioned by their representative
    label. ``test_rows``: a dataset's official test split (True = test); when it marks any row,
    those rows are the global test set instead of a stratified held-out fraction. Refused
    (naming ``class_names``): a global test set without a sample of a class seen in training,
    and more clients than samples. With ``data.public_fraction``, a stratified public slice
    (client ``PUBLIC``, split ``public``) is carved out first, from the rows outside an official
    test split, with ``data.public_seed``: the same rows whatever ``seed``; the global test set
    and the clients' data come from the rest."""
    given = np.asarray(labels)
    labels = representative_labels(given) if given.ndim == 2 and len(given) else given
    labels = labels.astype(np.int64)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
    holdout_rng, part_rng, split_rng, miss_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(params.seed).spawn(4)
    )
    official = None if test_rows is None else np.asarray(test_rows, dtype=bool)
    if official is not None and official.shape != labels.shape:
        raise ValueError(f"test_rows has {official.shape[0]} entries for {len(labels)} labels")
    has_official = official is not None and official.any()
    public = public_rows(labels, params, official if has_official else None)
    rest = np.setdiff1d(np.arange(len(labels)), public)
    if has_official:
        check_official_test(given, official, class_names)
        test = np.flatnonzero(official).astype(int)
    else:
        test = rest[_stratified_holdout(labels[rest], params.data.test_fraction, holdout_rng)]
        _check_holdout(given, test, params.data.test_fraction, class_names)
    pool = np.setdiff1d(rest, test)
    _check_sizes(len(labels), len(pool), params)
    k = params.clients.num_clients
    if params.clients.partition == "dirichlet":
        shares = _dirichlet(pool, labels, k, params.clients.dirichlet_alpha, part_rng)
    else:
        shares = _iid(pool, k, part_rng)
    frames = [_complete(test, GLOBAL_TEST, "test")] + ([_complete(public, PUBLIC, "public")] if len(public) else [])
    for client, share in enumerate(shares):
        frames.extend(_client_frames(client, share, params, split_rng, miss_rng))
    out = pd.concat(frames, ignore_index=True)
    out.insert(0, "seed", params.seed)
    return out


# --------------------------------------------------------------------------- statistics


def _histogram(rows: pd.Series, labels: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class; for multi-hot labels, how many samples carry each label."""
    if labels.ndim == 2:
        return labels[rows.to_numpy()].sum(0).astype(int).tolist()
    return np.bincount(labels[rows.to_numpy()], minlength=num_classes).astype(int).tolist()


def _rate(count: int, n: int) -> float:
    return float(count) / n if n else 0.0


def _missing_counts(train: pd.DataFrame) -> dict[str, int]:
    no_image = int((~train["has_image"]).sum())
    no_text = int((~train["has_text"]).sum())
    return {"image": no_image, "text": no_text, "any": int((~(train["has_image"] & train["has_text"])).sum())}


def _client_stats(df: pd.DataFrame, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    train, test = df[df["split"] == "train"], df[df["split"] == "test"]
    missing = _missing_counts(train)
    return {
        "n_train": len(train),
        "n_test": len(test),
        "missing_rate": {m: _rate(c, len(train)) for m, c in missing.items()},
        "label_histogram": {
            "train": _histogram(train["row"], labels, num_classes),
            "test": _histogram(test["row"], labels, num_classes),
        },
    }


def split_statistics(splits: pd.DataFrame, labels: Sequence[int], num_classes: int) -> dict[str, Any]:
    """JSON-serialisable summary, keyed by client id as a string so DVC can flatten it."""
    labels = np.asarray(labels)
    labels = labels.astype(np.int64) if labels.ndim == 1 else (labels > 0).astype(np.int64)
    global_test = splits[splits["client"] == GLOBAL_TEST]
    public = splits[splits["client"] == PUBLIC]
    clients = splits[splits["client"] >= 0]
    per_client = {str(int(k)): _client_stats(g, labels, num_classes) for k, g in clients.groupby("client")}
    train = clients[clients["split"] == "train"]
    missing = _missing_counts(train)
    return {
        "num_clients": len(per_client),
        "global_test": {"n": len(global_test), "label_histogram": _histogram(global_test["row"], labels, num_classes)},
        "clients": per_client,
        "totals": {
            "n_samples": int(splits["row"].nunique()),
            "n_train": len(train),
            "n_client_test": int((clients["split"] == "test").sum()),
            "n_global_test": len(global_test),
            "n_public": len(public),
            "missing": missing,
            "missing_rate": {m: _rate(c, len(train)) for m, c in missing.items()},
        },
    }


# --------------------------------------------------------------------------- persistence


def save_splits(df: pd.DataFrame, path: str | Path) -> None:
    """Parquet via a temp file and rename, so readers never see a half-written file."""
    with atomic_path(path) as tmp:
        df.loc[:, list(COLUMNS)].to_parquet(tmp, index=False)


def load_splits(path: str | Path) -> pd.DataFrame:
    """Read a splits file, failing with the file's name if it is absent, corrupt or incomplete."""
    path = Path(path)
    if not path.is_file():
        raise SplitsError(f"{path}: splits file not found; run the prepare stage to create it")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise SplitsError(f"{path}: not a readable parquet splits file ({err})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise SplitsError(f"{path}: missing column(s) {missing}; expected {list(COLUMNS)}; rerun `fedilora split`")
    return df


def for_seed(splits: pd.DataFrame, seed: int, path: str | Path) -> pd.DataFrame:
    """One seed's splits from a splits table; a seed the table lacks is named."""
    chosen = splits[splits["seed"] == seed]
    if chosen.empty:
        have = sorted(int(s) for s in splits["seed"].unique())
        raise SplitsError(f"{path}: no splits for seed {seed} (it has {have}); add it to compare.seeds or rerun `fedilora split`")
    return chosen.reset_index(drop=True)
