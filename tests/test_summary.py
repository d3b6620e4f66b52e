"""The pipeline's summary tables, from the eval.json records the steps wrote."""

from __future__ import annotations

from raptor.eval.summary import summary_tables


def _eval(r2_last: float, r2_affine_last: float) -> dict:
    per_layer = lambda last: {"all": [0.1, last]}  # noqa: E731
    return {
        "boundaries": [1],
        "layers": [1, 2],
        "top1": {"teacher": 0.9, "student": 0.8, "ratio": 0.8 / 0.9},
        "student": {"r2": per_layer(r2_last), "r2_affine": per_layer(r2_affine_last)},
        "identity": {"r2": per_layer(-0.5)},
    }


def test_headline_has_the_regression_r2_next_to_r2():
    steps = {
        "k2/eval": {"result": _eval(0.5, 0.875), "wall_s": 1.0},
        "k3/eval": {"result": _eval(0.25, 0.625), "wall_s": 1.0},
    }
    lines = summary_tables(steps)["headline"].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    i = header.index("final-layer R^2")
    assert header[i + 1] == "final-layer regression R^2"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[i], r[i + 1]) for r in rows] == [
        ("2", "0.500", "0.875"),
        ("3", "0.250", "0.625"),
    ]
    # an eval.json written before the metric existed still gives a table
    del steps["k3/eval"]["result"]["student"]["r2_affine"]
    assert summary_tables(steps)["headline"].splitlines()[3].split("|")[i + 2].strip() == "n/a"


def test_per_layer_table_has_every_dmd_variant_with_n_a_where_it_predicts_nothing():
    """Endpoint and ReplaceMe maps predict span ends only: their columns are there, with
    n/a at the layers they do not predict."""
    ev = _eval(0.5, 0.875)
    ev["dmd"] = {
        "span_ridge": {"r2": {"all": [0.25, 0.5]}},
        "replaceme_ridge": {"r2": {"all": [None, 0.75]}},
    }
    lines = summary_tables({"k2/eval": {"result": ev, "wall_s": 1.0}})["per_layer_r2"].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    i = header.index("DMD replaceme_ridge (k=2)")
    assert [r[i] for r in rows] == ["n/a", "0.750"]
    assert [r[header.index("DMD span_ridge (k=2)")] for r in rows] == ["0.250", "0.500"]
