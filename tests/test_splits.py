"""Client partition and missing-modality simulation: the guarantees the experiments rely on."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedilora.config import Params
from fedilora.data.splits import SplitsError, load_splits, make_splits, save_splits, split_statistics

NUM_CLASSES = 5
# Unbalanced classes so stratification is actually tested.
LABELS = np.repeat(np.arange(NUM_CLASSES), [200, 150, 100, 80, 70])


def params(**sections: Any) -> Params:
    """Params with small defaults; keyword arguments replace whole sections' fields."""
    data: dict[str, Any] = {"clients": {"num_clients": 6, "ranks": [4]}, "missing": {"rate": 0.4, "pattern": "both"}}
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return Params.model_validate(data)


def _train(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["split"] == "train"]


def test_columns_and_types():
    df = make_splits(LABELS, params())
    assert list(df.columns) == ["seed", "row", "client", "split", "has_image", "has_text"]
    assert df["row"].dtype == np.int64 and df["client"].dtype == np.int64
    assert df["has_image"].dtype == bool and df["has_text"].dtype == bool
    assert set(df["split"]) == {"train", "test"}
    assert set(df["client"]) == {-1, *range(6)}


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_every_sample_assigned_exactly_once(partition):
    df = make_splits(LABELS, params(clients={"partition": partition}))
    assert sorted(df["row"]) == list(range(len(LABELS)))
    clients = df[df["client"] >= 0]
    assert clients.groupby("row")["client"].nunique().max() == 1


def test_global_test_is_stratified_and_sized():
    p = params(data={"test_fraction": 0.2})
    test = make_splits(LABELS, p).query("client == -1")
    assert (test["split"] == "test").all()
    assert len(test) == round(0.2 * len(LABELS))
    observed = np.bincount(LABELS[test["row"]], minlength=NUM_CLASSES) / len(test)
    expected = np.bincount(LABELS) / len(LABELS)
    assert np.abs(observed - expected).max() < 0.01


def test_test_splits_keep_both_modalities():
    df = make_splits(LABELS, params(missing={"rate": 1.0, "pattern": "both"}))
    test = df[df["split"] == "test"]
    assert test["has_image"].all() and test["has_text"].all()
    assert (test["client"] >= 0).any()  # client test sets, not only the global one


def test_clients_train_test_fraction():
    p = params(clients={"test_fraction": 0.25})
    df = make_splits(LABELS, p)
    for _, g in df[df["client"] >= 0].groupby("client"):
        n = len(g)
        n_test = int((g["split"] == "test").sum())
        assert n - n_test >= 1
        assert n_test == round(0.25 * n)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.4, 0.6, 1.0])
@pytest.mark.parametrize("pattern", ["image", "text", "both"])
def test_missing_rate_exact_per_client(rate, pattern):
    df = make_splits(LABELS, params(missing={"rate": rate, "pattern": pattern}))
    for _, g in _train(df).groupby("client"):
        n = len(g)
        affected = int((~(g["has_image"] & g["has_text"])).sum())
        assert affected == round(rate * n)
        assert abs(affected / n - rate) <= 1 / n


def test_pattern_semantics():
    def lost(pattern: str) -> tuple[int, int, int]:
        train = _train(make_splits(LABELS, params(missing={"rate": 0.5, "pattern": pattern})))
        return (int((~train["has_image"]).sum()), int((~train["has_text"]).sum()),
                int((~train["has_image"] & ~train["has_text"]).sum()))

    no_image, no_text, no_both = lost("image")
    assert no_image > 0 and no_text == 0 and no_both == 0
    no_image, no_text, no_both = lost("text")
    assert no_image == 0 and no_text > 0 and no_both == 0
    no_image, no_text, no_both = lost("both")
    assert no_both == 0
    assert 0.35 < no_image / (no_image + no_text) < 0.65  # a fair coin per affected sample


def test_no_sample_loses_both_even_at_full_rate():
    train = _train(make_splits(LABELS, params(missing={"rate": 1.0, "pattern": "both"})))
    assert (train["has_image"] ^ train["has_text"]).all()


def test_per_client_rates_and_patterns():
    rates = [0.0, 0.2, 0.5, 0.8, 1.0, 0.3]
    patterns = ["image", "text", "both", "image", "text", "both"]
    df = make_splits(LABELS, params(missing={"rate": rates, "pattern": patterns}))
    for k, g in _train(df).groupby("client"):
        n = len(g)
        no_image, no_text = int((~g["has_image"]).sum()), int((~g["has_text"]).sum())
        assert no_image + no_text == round(rates[k] * n)
        if patterns[k] == "image":
            assert no_text == 0
        if patterns[k] == "text":
            assert no_image == 0


def test_same_seed_same_splits_other_seed_different():
    a = make_splits(LABELS, params(seed=3))
    pd.testing.assert_frame_equal(a, make_splits(LABELS, params(seed=3)))
    b = make_splits(LABELS, params(seed=4))
    assert not a.equals(b)


def test_missing_rate_change_leaves_partition_unchanged():
    a = make_splits(LABELS, params(missing={"rate": 0.2}))
    b = make_splits(LABELS, params(missing={"rate": 0.6}))
    pd.testing.assert_frame_equal(a[["row", "client", "split"]], b[["row", "client", "split"]])


def _skew(df: pd.DataFrame) -> float:
    """Mean over clients of the largest class share in its data: 1/C when balanced, 1 when one class."""
    shares = []
    for _, g in df[df["client"] >= 0].groupby("client"):
        hist = np.bincount(LABELS[g["row"]], minlength=NUM_CLASSES)
        shares.append(hist.max() / hist.sum())
    return float(np.mean(shares))


def test_dirichlet_small_alpha_skews_labels():
    iid = make_splits(LABELS, params(clients={"partition": "iid"}))
    skewed = make_splits(LABELS, params(clients={"partition": "dirichlet", "dirichlet_alpha": 0.1}))
    assert _skew(iid) < 0.5
    assert _skew(skewed) > 0.7
    sizes = skewed[skewed["client"] >= 0].groupby("client").size()
    assert sizes.min() >= 2 and len(sizes) == 6


def test_more_clients_than_samples_raises():
    with pytest.raises(ValueError, match=r"clients\.num_clients=20.*8 client samples"):
        make_splits(np.arange(10) % 2, params(clients={"num_clients": 20}))


def test_impossible_dirichlet_raises_clearly():
    with pytest.raises(ValueError, match=r"dirichlet.*clients\.num_clients=40.*dirichlet_alpha"):
        make_splits(LABELS, params(clients={"num_clients": 40, "partition": "dirichlet", "dirichlet_alpha": 0.001}))


def test_statistics_are_json_and_consistent():
    p = params(missing={"rate": 0.4, "pattern": "both"})
    df = make_splits(LABELS, p)
    stats = json.loads(json.dumps(split_statistics(df, LABELS, NUM_CLASSES)))
    assert stats["num_clients"] == 6
    assert stats["global_test"]["n"] == (df["client"] == -1).sum()
    assert sum(stats["global_test"]["label_histogram"]) == stats["global_test"]["n"]
    clients = stats["clients"]
    assert set(clients) == {str(k) for k in range(6)}
    totals = stats["totals"]
    assert totals["n_samples"] == len(LABELS)
    assert sum(c["n_train"] for c in clients.values()) == totals["n_train"]
    assert totals["n_train"] + totals["n_client_test"] + totals["n_global_test"] == len(LABELS)
    for c in clients.values():
        assert sum(c["label_histogram"]["train"]) == c["n_train"]
        assert sum(c["label_histogram"]["test"]) == c["n_test"]
        rate = c["missing_rate"]
        assert rate["any"] == pytest.approx(rate["image"] + rate["text"])
        assert abs(rate["any"] - 0.4) <= 1 / c["n_train"]


def test_save_load_roundtrip(tmp_path):
    df = make_splits(LABELS, params())
    path = tmp_path / "out" / "splits.parquet"
    save_splits(df, path)
    pd.testing.assert_frame_equal(load_splits(path), df)
    assert [p.name for p in path.parent.iterdir()] == ["splits.parquet"]  # no temp file left


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SplitsError, match=r"absent\.parquet.*not found"):
        load_splits(tmp_path / "absent.parquet")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(SplitsError, match="corrupt.parquet"):
        load_splits(corrupt)
    partial = tmp_path / "partial.parquet"
    pd.DataFrame({"row": [0], "client": [0]}).to_parquet(partial)
    with pytest.raises(SplitsError, match=r"partial\.parquet.*has_image"):
        load_splits(partial)
