"""params.yaml validation: errors name the file, the field and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedilora import variants
from fedilora.config import ConfigError, Params, load_params

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        out |= _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


def test_repository_params_file_is_valid_and_complete() -> None:
    """DVC stages name params by key, so params.yaml must spell out every knob."""
    params = load_params(REPO / "params.yaml")
    on_disk = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _keys(on_disk) == _keys(params.model_dump(mode="json"))
    assert len(params.clients.client_ranks()) == params.clients.num_clients


@pytest.mark.parametrize(
    "data, field",
    [
        ({"federaton": {}}, "federaton"),  # misspelt section
        ({"federation": {"lrr": 0.1}}, "federation.lrr"),
        ({"federation": {"rounds": "many"}}, "federation.rounds"),
        ({"clients": {"num_clients": 2, "ranks": [0, 4]}}, "clients.ranks.0"),
        ({"clients": {"num_clients": 2, "ranks": [-1, 4]}}, "clients.ranks.0"),
        ({"missing": {"rate": 1.5}}, "missing.rate"),
        ({"missing": {"pattern": "audio"}}, "missing.pattern"),
        ({"clients": {"dirichlet_alpha": 0}}, "clients.dirichlet_alpha"),
        ({"editing": {"mode": "swap"}}, "editing.mode"),
        ({"runner": {"task_runner": "spark"}}, "runner.task_runner"),
        ({"runner": {"task_runner": "ray", "address": "tcp://10.0.0.5:8786"}}, "runner"),  # a Dask address
        ({"runner": {"task_runner": "dask", "address": "ray://head:10001"}}, "runner"),
        ({"runner": {"n_workers": 0}}, "runner.n_workers"),
    ],
)
def test_bad_values_name_their_field(tmp_path: Path, data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, data))
    assert field in str(err.value)
    assert "params.yaml" in str(err.value)


def test_methods_are_checked_before_a_run(tmp_path: Path) -> None:
    """The params file knows no method; ``check_methods`` (run first by the flows) names the param."""
    from fedilora.federation import check_methods

    data = {"aggregation": {"method": "fedilora"}, "compare": {"variants": ["hetlora", "fedavg"]}}
    with pytest.raises(ValueError, match=r"compare.variants: fedavg: aggregation.method: fedavg needs equal ranks.*clients.ranks"):
        check_methods(load_params(_write(tmp_path, data)))
    data["clients"] = {"num_clients": 3, "ranks": [8]}
    check_methods(load_params(_write(tmp_path, data)))
    with pytest.raises(ValueError, match=r"aggregation.method: unknown aggregation method 'fedprox'.*fedilora"):
        check_methods(load_params(_write(tmp_path, {"aggregation": {"method": "fedprox"}})))
    with pytest.raises(ValueError, match=r"aggregation.options: method 'fedilora' got unknown options \['rnak'\]"):
        check_methods(load_params(_write(tmp_path, {"aggregation": {"options": {"rnak": 3}}})))


def test_rank_list_length_must_match_clients(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="clients.num_clients=3"):
        load_params(_write(tmp_path, {"clients": {"num_clients": 3, "ranks": [4, 8]}}))


def test_per_client_missing_lists(tmp_path: Path) -> None:
    data = {"clients": {"num_clients": 2, "ranks": [4]}, "missing": {"rate": [0.1, 0.9], "pattern": ["image", "text"]}}
    assert load_params(_write(tmp_path, data)).client_missing() == [(0.1, "image"), (0.9, "text")]
    data["missing"]["rate"] = [0.1]
    with pytest.raises(ConfigError, match="missing.rate"):
        load_params(_write(tmp_path, data))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


def test_overrides_and_variants(tmp_path: Path) -> None:
    params = load_params(_write(tmp_path, {}), {"aggregation.method": "hetlora", "federation.rounds": 3})
    assert params.aggregation.method == "hetlora" and params.federation.rounds == 3
    variant = variants.resolve(params, "fedilora+edit")
    assert variant.aggregation.method == "fedilora" and variant.editing.enabled
    assert not variants.resolve(params, "flexlora").editing.enabled
    official = variants.resolve(params, "fedilora+edit@official")
    assert official.aggregation.options == {"unowned": "zero", "first_round": "fresh", "b_columns": "official"}
    assert official.lora.alpha_mode == "fixed" and official.lora.alpha == 32 and official.missing.fill == "placeholder"
    assert variants.resolve(params, "flora@official").aggregation.options["merge_scaling"] == "sum_of_ranks"
    with pytest.raises(ValueError, match="is not METHOD"):
        variants.resolve(params, "fedilora+magic")
    with pytest.raises(ConfigError, match="compare.variants"):
        load_params(_write(tmp_path, {"compare": {"variants": ["fedilora+magic"]}}))


def test_alpha_rule() -> None:
    params = Params()
    assert params.lora.alpha_for(8) / 8 == params.lora.alpha_for(2) / 2  # per_rank: equal scaling
    fixed = params.lora.model_copy(update={"alpha_mode": "fixed"})
    assert fixed.alpha_for(8) == fixed.alpha_for(2) == fixed.alpha
