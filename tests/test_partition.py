"""`Partition`: its views against a brute-force reading of the boundaries, its JSON, file
and config forms, and the errors that name what to fix."""

from __future__ import annotations

import itertools
import json

import pytest

from raptor.config import ConfigError, load_config
from raptor.model.partition import ArchitectureError, Partition


def all_partitions(num_layers):
    """Every partition of 1..L into contiguous phases, as boundary lists."""
    for k in range(1, num_layers + 1):
        yield from (list(c) for c in itertools.combinations(range(1, num_layers), k - 1))


def phase_of_each_layer(num_layers, boundaries):
    """Brute force: walk the layers, starting a new phase after each boundary."""
    phase, out = 0, {}
    for layer in range(1, num_layers + 1):
        out[layer] = phase
        if layer in boundaries:
            phase += 1
    return out


@pytest.mark.parametrize("num_layers", [1, 2, 5, 7])
def test_views_match_a_brute_force_reading(num_layers):
    for boundaries in all_partitions(num_layers):
        p = Partition(num_layers, boundaries)
        owner = phase_of_each_layer(num_layers, boundaries)
        assert p.k == len(boundaries) + 1
        assert [p.block_of(layer) for layer in owner] == list(owner.values())
        layers = [[m for m in owner if owner[m] == j] for j in range(p.k)]
        assert p.phases == [(ls[0], ls[-1]) for ls in layers]
        # a DMD span (i, p) starts from a_i and predicts layers i+1..i+p
        assert [list(range(i + 1, i + n + 1)) for i, n in p.spans] == layers
        assert p.edges == [0, *boundaries, num_layers]
        assert Partition.from_json(json.loads(json.dumps(p.to_json()))) == p
    with pytest.raises(ValueError, match=r"outside 1\.\.5"):
        Partition(5, [2]).block_of(6)


def test_even_split():
    assert Partition.even(12, 3).boundaries == (4, 8)
    assert Partition.even(12, 1) == Partition(12)
    for num_layers, k in [(12, 5), (7, 3), (6, 4), (4, 4)]:
        lengths = [
            b - a
            for a, b in zip(
                Partition.even(num_layers, k).edges[:-1], Partition.even(num_layers, k).edges[1:]
            )
        ]
        assert len(lengths) == k and max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize(
    "num_layers,boundaries,message",
    [
        (12, [7, 7], "strictly increasing; fix phases.boundaries"),
        (12, [10, 7], "strictly increasing"),
        (12, [0, 7], r"every boundary must lie in 1\.\.11"),
        (12, [7, 12], r"every boundary must lie in 1\.\.11"),
        (0, [], "num_layers >= 1"),
    ],
)
def test_invalid_partitions_fail_clearly(num_layers, boundaries, message):
    with pytest.raises(ArchitectureError, match=message):
        Partition(num_layers, boundaries)


def test_k_is_checked_on_demand():
    p = Partition(12, [7, 10])
    assert p.with_k(3) is p
    with pytest.raises(ArchitectureError, match="k=2 phases need 1 boundaries, got 2"):
        p.with_k(2)


def test_from_file(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"num_layers": 12, "boundaries": [7, 10]}))
    combined = tmp_path / "phases.json"
    combined.write_text(
        json.dumps(
            {
                "num_layers": 12,
                "method": "dp",
                "token_mode": "all",
                "partitions": {"2": [7], "3": [7, 10]},
                "random": {"3": [[2, 5]]},
            }
        )
    )
    assert Partition.from_file(one, 3) == Partition(12, [7, 10])
    assert Partition.from_file(combined, 2) == Partition(12, [7])
    with pytest.raises(ConfigError, match=r"k in \['2', '3'\], not k=4"):
        Partition.from_file(combined, 4)
    with pytest.raises(ConfigError, match="k=2 phases need 1 boundaries"):
        Partition.from_file(one, 2)
    with pytest.raises(ConfigError, match="not found"):
        Partition.from_file(tmp_path / "nope.json", 2)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Partition.from_file(bad, 2)
    bad.write_text(json.dumps({"num_layers": 6, "boundaries": [3, 9]}))
    with pytest.raises(ConfigError, match=r"bad.json: .*must lie in 1\.\.5"):
        Partition.from_file(bad, 3)


def test_from_config(tmp_path):
    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps({"num_layers": 6, "partitions": {"2": [4], "3": [2, 4]}}))
    given = load_config(None, ["model.k=2", "phases.boundaries=[3]", f"phases.file={phases}"])
    assert Partition.from_config(given, 6) == Partition(6, [3])  # boundaries win over the file
    from_file = load_config(None, ["model.k=3", f"phases.file={phases}"])
    assert Partition.from_config(from_file, 6) == Partition(6, [2, 4])
    with pytest.raises(ConfigError, match="splits 6 layers but the teacher has 8"):
        Partition.from_config(from_file, 8)
    with pytest.raises(ConfigError, match="no phase partition for model.k=3"):
        Partition.from_config(load_config(None, []), 6)
    with pytest.raises(ArchitectureError, match=r"in 1\.\.5"):
        Partition.from_config(load_config(None, ["phases.boundaries=[6]"]), 6)
