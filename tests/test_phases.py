"""Phase discovery: partitions vs brute force and a naive bisection, the streamed
similarity vs a float64 computation on all data, phases files, the matrix CLI."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit

from raptor.cli import main as cli_main
from raptor.config import ConfigError, load_config
from raptor.eval.phases import (
    LayerSimilarity,
    cut_value,
    dissimilarity,
    partition,
    partition_bisect,
    random_partitions,
    split_gains,
)


def _random_similarity(rng, L, symmetric=True):
    m = rng.uniform(-1, 1, size=(L, L))
    if symmetric:
        m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def _segments(boundaries, L):
    edges = [0, *boundaries, L]
    return [list(range(a + 1, b + 1)) for a, b in zip(edges, edges[1:])]


def _pair_weight(sim, i, j):
    """Dissimilarity of 1-based layers i != j, averaged over both orders."""
    return ((1 - sim[i - 1, j - 1]) + (1 - sim[j - 1, i - 1])) / 2


def _brute_force(sim, k, min_length):
    """Best contiguous partition by enumeration: max total cut over unordered pairs."""
    L = sim.shape[0]
    best = None
    for b in itertools.combinations(range(1, L), k - 1):
        segs = _segments(b, L)
        if min(len(s) for s in segs) < min_length:
            continue
        phase = {layer: n for n, s in enumerate(segs) for layer in s}
        cut = sum(
            _pair_weight(sim, i, j)
            for i in range(1, L + 1)
            for j in range(i + 1, L + 1)
            if phase[i] != phase[j]
        )
        if best is None or cut > best[0]:
            best = (cut, list(b))
    return best


def _most_phases(n, min_length, min_split):
    """The most phases bisect can cut n layers into, by recursion over the first split."""
    if n < min_split:
        return 1
    splits = range(min_length, n - min_length + 1)
    return max(
        [1]
        + [
            _most_phases(c, min_length, min_split) + _most_phases(n - c, min_length, min_split)
            for c in splits
        ]
    )


def _naive_bisect(sim, k, min_length, min_split=1):
    """Transcription of the definition: split the segment whose best contiguous
    two-way split has the largest crossing dissimilarity, until k segments;
    ties -> earliest split point, then earliest segment. Segments shorter than
    min_split are never split; a split is admissible when k segments of
    >= min_length layers can still be reached."""
    L = sim.shape[0]
    segments = [list(range(1, L + 1))]
    while len(segments) < k:
        candidates = []  # (value, segment position, split position)
        for pos, seg in enumerate(segments):
            best = None
            if len(seg) < min_split:
                continue
            for c in range(min_length, len(seg) - min_length + 1):
                left, right = seg[:c], seg[c:]
                after = segments[:pos] + [left, right] + segments[pos + 1 :]
                if sum(_most_phases(len(s), min_length, min_split) for s in after) < k:
                    continue
                value = sum(_pair_weight(sim, i, j) for i in left for j in right)
                if best is None or value > best[0]:
                    best = (value, pos, c)
            if best is not None:
                candidates.append(best)
        chosen = candidates[0]
        for cand in candidates[1:]:
            if cand[0] > chosen[0]:
                chosen = cand
        _, pos, c = chosen
        seg = segments[pos]
        segments[pos : pos + 1] = [seg[:c], seg[c:]]
    return [seg[-1] for seg in segments[:-1]]


CASES = [
    (L, k, m)
    for L in (3, 5, 8, 11)
    for k in (1, 2, 3, 4)
    for m in (1, 2, 3)
    if k <= L and k * m <= L
]


@pytest.mark.parametrize("L,k,min_length", CASES)
def test_dp_equals_brute_force(L, k, min_length):
    rng = np.random.default_rng(100 * L + 10 * k + min_length)
    for trial in range(3):
        sim = _random_similarity(rng, L, symmetric=trial != 2)
        cut, expected = _brute_force(sim, k, min_length)
        got = partition(sim, k, "dp", min_length=min_length)
        assert got == expected
        assert cut_value(dissimilarity(sim), got) == pytest.approx(cut, rel=1e-12, abs=1e-12)
        # the same matrix given as a distance, W = 1 - S
        assert partition(1 - sim, k, "dp", kind="distance", min_length=min_length) == expected


def test_dp_breaks_ties_towards_early_boundaries():
    assert partition(np.ones((6, 6)), 3, "dp") == [1, 2]
    assert partition(np.ones((7, 7)), 3, "dp", min_length=2) == [2, 4]


@pytest.mark.parametrize("L,k,min_length", CASES)
@pytest.mark.parametrize("min_split", [1, 4])
def test_bisect_equals_naive_transcription(L, k, min_length, min_split):
    if k > _most_phases(L, min_length, min_split):
        with pytest.raises(ValueError, match=f"min_split={min_split}"):
            partition(np.eye(L), k, "bisect", min_length=min_length, min_split=min_split)
        return
    rng = np.random.default_rng(7 + 100 * L + 10 * k + min_length)
    options = dict(min_length=min_length, min_split=min_split)
    for trial in range(3):
        sim = _random_similarity(rng, L, symmetric=trial != 2)
        expected = _naive_bisect(sim, k, min_length, min_split)
        assert partition(sim, k, "bisect", **options) == expected
    flat = np.ones((L, L))  # every split ties
    assert partition(flat, k, "bisect", **options) == _naive_bisect(flat, k, min_length, min_split)


def test_bisect_never_splits_a_phase_under_min_split():
    # 1-4 | 5-7, layer 5 far from 6-7 and 1-2 a little apart from 3-4: the best third
    # phase cuts 5-7 after 5, which min_split=4 (the default) forbids; 1-4 is split instead
    sim = np.full((7, 7), 0.1)
    sim[:4, :4] = 0.6
    sim[:2, 2:4] = sim[2:4, :2] = 0.5
    sim[4:, 4:] = 0.6
    sim[4, 5:] = sim[5:, 4] = -0.5
    np.fill_diagonal(sim, 1.0)
    assert partition(sim, 2, "bisect", min_split=1) == partition(sim, 2, "bisect") == [4]
    assert partition(sim, 3, "bisect", min_split=1) == [4, 5]
    assert partition(sim, 3, "bisect") == partition(sim, 3, "bisect", min_split=4) == [2, 4]


def test_bisect_is_optimal_for_two_phases_and_greedy_beyond():
    rng = np.random.default_rng(3)
    for _ in range(5):
        sim = _random_similarity(rng, 9)
        assert partition(sim, 2, "bisect") == partition(sim, 2, "dp")
    # block structure 1-4 | 5-7 | 8-9: both methods recover it
    sim = np.full((9, 9), 0.1)
    for a, b in [(0, 4), (4, 7), (7, 9)]:
        sim[a:b, a:b] = 0.9
    assert partition(sim, 3, "dp") == partition(sim, 3, "bisect") == [4, 7]


def test_partition_errors():
    with pytest.raises(ValueError, match="k=4 phases of at least 3"):
        partition(np.eye(8), 4, "dp", min_length=3)
    with pytest.raises(ValueError, match="square"):
        partition(np.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="NaN"):
        partition(np.full((3, 3), np.nan), 2)
    with pytest.raises(ValueError, match="method"):
        partition(np.eye(3), 2, "kmeans")


def test_random_partitions_are_valid_seeded_and_uniform():
    draws = random_partitions(6, 3, 3000, seed=1)
    assert draws == random_partitions(6, 3, 3000, seed=1)
    assert draws[:20] != random_partitions(6, 3, 20, seed=2)
    _assert_uniform(draws, list(itertools.combinations(range(1, 6), 2)))  # all 10 partitions
    # phases of at least 2 layers: the valid partitions, enumerated by brute force
    valid = [
        b
        for b in itertools.combinations(range(1, 11), 3)
        if min(len(s) for s in _segments(list(b), 11)) >= 2
    ]
    _assert_uniform(random_partitions(11, 4, 2000, seed=0, min_length=2), valid)
    assert random_partitions(5, 1, 2) == [[], []]


def _assert_uniform(draws, support):
    """Every draw in `support`, each element of it drawn, and the counts consistent with a
    uniform law: Pearson's chi-square test at the 0.1% level (seeded, so deterministic)."""
    from scipy.stats import chisquare

    counts = Counter(tuple(b) for b in draws)
    assert set(counts) == set(support)
    assert chisquare([counts[b] for b in support]).pvalue > 1e-3


def _reference_similarity(traj, mode, groups):
    """float64 S[l, m] = mean over images and vectors of cos(a_l, a_m), all data at once."""
    x = traj[:, 1:].double()
    if mode == "cls+patchmean":
        x = torch.cat([x[:, :, groups["cls"]], x[:, :, groups["patch"]].mean(2, keepdim=True)], 2)
    L = x.shape[1]
    out = np.zeros((L, L))
    for i in range(L):
        for j in range(L):
            out[i, j] = F.cosine_similarity(x[:, i], x[:, j], dim=-1).mean().item()
    return out


@pytest.mark.parametrize("mode", ["all", "cls+patchmean"])
def test_streamed_similarity_equals_float64_on_all_data(mode):
    torch.manual_seed(0)
    N, L, T, D = 7, 4, 6, 5
    groups = {"cls": slice(0, 1), "reg": slice(1, 3), "patch": slice(3, None)}
    base = torch.randn(1, 1, T, D)
    traj = (base + 0.7 * torch.randn(N, L + 1, T, D)).float()  # correlated layers
    acc = LayerSimilarity(L, mode)
    for part in traj.split([3, 1, 3]):
        acc.update(part, groups)
    padding = torch.randn(2, L + 1, T, D)
    acc.update(padding, groups, valid=torch.tensor([False, False]))  # padding rows are ignored
    got = acc.compute()
    assert acc.num_images == N and got.shape == (L, L)
    np.testing.assert_allclose(got, _reference_similarity(traj, mode, groups), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-12)


def test_similarity_with_registers_ignored_in_cls_patchmean():
    torch.manual_seed(1)
    groups = {"cls": slice(0, 1), "reg": slice(1, 3), "patch": slice(3, None)}
    traj = torch.randn(4, 4, 7, 3)
    changed = traj.clone()
    changed[:, :, 1:3] = torch.randn(4, 4, 2, 3)  # registers only
    a, b = LayerSimilarity(3), LayerSimilarity(3)
    a.update(traj, groups)
    b.update(changed, groups)
    np.testing.assert_allclose(a.compute(), b.compute(), atol=1e-12)
    with pytest.raises(ValueError, match="needs groups"):
        LayerSimilarity(3).update(traj, None)
    with pytest.raises(ValueError, match=r"\(B, 4, T, D\)"):
        LayerSimilarity(3).update(traj[:, :3], groups)


def _block_similarity(rng, sizes):
    L = sum(sizes)
    sim = np.full((L, L), 0.1)
    start = 0
    for s in sizes:
        sim[start : start + s, start : start + s] = 0.9
        start += s
    noise = rng.normal(scale=0.02, size=(L, L))
    return sim + (noise + noise.T) / 2


@pytest.mark.parametrize("method", ["dp", "bisect"])
def test_matrix_cli_prints_both_partitions_and_objectives(tmp_path, capsys, method):
    rng = np.random.default_rng(0)
    sim = _block_similarity(rng, [3, 2, 3])
    np.save(tmp_path / "s.npy", sim)
    np.savetxt(tmp_path / "d.txt", 1 - sim)
    rc = cli_main(["phases", "--matrix", str(tmp_path / "s.npy"), "--k", "3", "--method", method])
    assert rc == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    other = "bisect" if method == "dp" else "dp"
    assert printed["boundaries"] == partition(sim, 3, method)
    # bisect's unnormalised cuts favour [3, 4] here, dp finds the block structure
    assert printed["objectives"]["dp"]["boundaries"] == [3, 5]
    assert printed["objectives"]["bisect"]["boundaries"] == [3, 4]
    pairs = _total_pair_weight(sim)
    assert printed["total_weight"] == pytest.approx(pairs, abs=1e-12)
    for name in ("dp", "bisect"):
        b = printed["objectives"][name]["boundaries"]
        cut = pairs - _within(sim, b)
        assert printed["objectives"][name]["within"] == pytest.approx(_within(sim, b), abs=1e-12)
        assert sum(printed["objectives"][name]["split_gains"]) == pytest.approx(cut, abs=1e-12)
    assert err.index(f"{method} [") < err.index(f"{other} [")  # the chosen method first
    argv = ["phases", "--matrix", str(tmp_path / "d.txt"), "--kind", "distance", "--k", "2"]
    assert cli_main([*argv, "--method", method]) == 0
    expected = partition(sim, 2, method)
    assert json.loads(capsys.readouterr().out)["boundaries"] == expected
    assert cli_main([*argv, "--method", method, "--min-length", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["boundaries"] == [4]


def _within(sim, boundaries):
    segs = _segments(boundaries, sim.shape[0])
    return sum(_pair_weight(sim, i, j) for s in segs for i in s for j in s if i < j)


def _total_pair_weight(sim):
    L = sim.shape[0]
    return sum(_pair_weight(sim, i, j) for i in range(1, L + 1) for j in range(i + 1, L + 1))


def test_matrix_cli_errors(tmp_path, capsys):
    np.savetxt(tmp_path / "bad.txt", np.ones((3, 4)))
    assert cli_main(["phases", "--matrix", str(tmp_path / "bad.txt"), "--k", "2"]) == 2
    assert "square" in capsys.readouterr().err
    assert cli_main(["phases", "--matrix", str(tmp_path / "missing.npy"), "--k", "2"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main(["phases", "--matrix", str(tmp_path / "bad.txt")]) == 2
    assert "--k" in capsys.readouterr().err
    assert cli_main(["phases"]) == 2
    assert "CONFIG" in capsys.readouterr().err
    argv = ["phases", "--matrix", str(REFERENCE), "--kind", "distance", "--eps", "0.2"]
    assert cli_main([*argv, "--k", "3", "--method", "bisect"]) == 2  # eps stops at 2 phases
    assert "stopped at 2 phases, short of k=3" in capsys.readouterr().err
    assert cli_main(argv) == 2  # dp has no eps rule: it needs k
    assert "dp needs k" in capsys.readouterr().err


# --------------------------------------------------------------------------- the reference

REFERENCE = Path(__file__).parent / "data" / "dinov2_vitb14_reg_cosine_distance.txt"
CONFIGS = Path(__file__).parents[1] / "configs"
PUBLISHED = {2: [7], 3: [7, 10], 4: [4, 7, 10]}  # the paper's Table 3


def _notebook_max_cut(d, eps_fraction, min_size=2):
    """The reference notebook's rule, written from its description: split every cluster
    of at least 2 x min_size layers whose best (unconstrained, brute-force) two-way cut
    gains more than eps_fraction x the total weight, recursively; -> (sorted clusters of
    1-based layers, gains)."""
    total = np.triu(d, 1).sum()
    clusters, gains, todo = [], [], [list(range(d.shape[0]))]
    while todo:
        idx = todo.pop()
        best = None
        if len(idx) >= 2 * min_size:
            for bits in itertools.product([False, True], repeat=len(idx) - 1):
                side = (False, *bits)
                gain = sum(d[i, j] for a, i in zip(side, idx) for b, j in zip(side, idx) if a < b)
                if best is None or gain > best[0]:
                    best = (gain, side)
        if best is None or not best[0] > eps_fraction * total:
            clusters.append([i + 1 for i in idx])
            continue
        gains.append(best[0])
        todo += [[i for s, i in zip(best[1], idx) if s == half] for half in (False, True)]
    return sorted(clusters), sorted(gains, reverse=True)


def test_reference_matrix_gives_the_published_partitions_with_the_dinov2_configs():
    d = np.loadtxt(REFERENCE)
    assert d.shape == (12, 12) and np.array_equal(d, d.T) and not np.diag(d).any()
    pc = load_config(CONFIGS / "dinov2_vitb14_reg_base.yaml", []).phases
    assert list(pc.ks) == sorted(PUBLISHED)
    options = dict(kind="distance", min_length=pc.min_length, min_split=pc.min_split, eps=pc.eps)
    for k, published in PUBLISHED.items():
        assert partition(d, k, pc.method, **options) == published
    # dp's optimal within cost differs for k = 3
    assert [partition(d, k, "dp", kind="distance") for k in (2, 3, 4)] == [[7], [5, 9], [4, 7, 10]]
    assert _within(1 - d, [5, 9]) == pytest.approx(4.90)
    assert _within(1 - d, [7, 10]) == pytest.approx(5.76)


def test_eps_rule_reproduces_the_reference_notebook():
    """The notebook's eps (0.2, 0.1, 0.09 of the total weight) on its own matrix: its
    printed clusters, from a transcription of its rule and from bisect with eps alone."""
    d = np.loadtxt(REFERENCE)
    printed = {  # the notebook's outputs (cells 9, 11, 13), 1-based layers
        0.2: [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]],
        0.1: [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12]],
        0.09: [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10], [11, 12]],
    }
    for eps, clusters in printed.items():
        found, gains = _notebook_max_cut(d, eps)
        assert found == clusters
        boundaries = partition(d, None, "bisect", kind="distance", eps=eps)
        assert boundaries == [c[-1] for c in clusters[:-1]]
        assert split_gains(dissimilarity(d, "distance"), boundaries) == pytest.approx(gains)
    assert gains == pytest.approx([24.46, 3.66, 3.16])


def _eps_recursion(w, eps, min_split):
    """Every phase of >= min_split layers whose best contiguous split gains more than
    eps x the total pair weight is split there, recursively (order-free)."""
    threshold = eps * np.triu(w, 1).sum()
    out, todo = [], [(0, w.shape[0])]
    while todo:
        a, b = todo.pop()
        best = max(((w[a:c, c:b].sum(), c) for c in range(a + 1, b)), default=None)
        if b - a >= min_split and best is not None and best[0] > threshold:
            todo += [(a, best[1]), (best[1], b)]
        else:
            out.append(b)
    return sorted(out)[:-1]


@pytest.mark.parametrize("min_split", [1, 4])
def test_eps_partitions_are_those_bisect_passes_through(min_split):
    """bisect with eps alone = the order-free recursion of the reference's rule, and
    bisect to that many phases gives the same partition."""
    rng = np.random.default_rng(min_split)
    for _ in range(6):
        w = dissimilarity(_random_similarity(rng, 10))
        for eps in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4):
            expected = _eps_recursion(w, eps, min_split)
            got = partition_bisect(w, None, min_split=min_split, eps=eps)
            assert got == expected
            k = len(expected) + 1
            assert partition_bisect(w, k, min_split=min_split) == expected
            assert partition_bisect(w, k, min_split=min_split, eps=eps) == expected


def test_split_gains_sum_to_the_cut_in_bisect_order():
    rng = np.random.default_rng(5)
    for _ in range(5):
        sim = _random_similarity(rng, 9)
        w = dissimilarity(sim)
        for k in (2, 3, 4):
            b = partition(sim, k, "bisect", min_split=1)
            gains = split_gains(w, b)
            assert sum(gains) == pytest.approx(_total_pair_weight(sim) - _within(sim, b))
            # bisect's first split is the best split of 1..L, and split_gains lists it first
            first = max(_within(sim, []) - _within(sim, [c]) for c in range(1, 9))
            assert gains[0] == pytest.approx(first)


def test_phases_config_keys():
    from raptor import config
    from raptor.eval import phases

    assert config.PHASE_SPLITS == phases.SPLITS
    assert config.PhasesConfig().min_split == phases.MIN_SPLIT
    for override, message in [
        (
            "phases.split=test",
            "phases.split=test is not a valid choice: expected one of train, val",
        ),
        ("phases.eps=1.5", "phases.eps=1.5 is out of range"),
        ("phases.min_split=0", "phases.min_split=0 is out of range"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])


def _expected_partition(sim, k, method, min_length):
    if method == "dp":
        return _brute_force(sim, k, min_length)[1]
    return _naive_bisect(sim, k, min_length, min_split=4)


@pytest.mark.parametrize("split,method", [("val", "dp"), ("train", "bisect")])
def test_discover_phases_end_to_end(tmp_path, digits_shards, capsys, split, method):
    """`raptor phases CONFIG` on digits shards with a tiny saved teacher: the matrix
    equals a float64 computation on the same images of the configured split, both
    methods' partitions and objectives are printed and recorded, the files are written,
    and a second run is skipped."""

    from raptor.data.stream import ShardDataModule
    from raptor.eval.phases import discover_phases
    from raptor.model.teacher import Teacher

    vit = make_vit(
        img_size=8,
        patch_size=2,
        embed_dim=16,
        depth=6,
        num_heads=2,
        reg_tokens=2,
        num_classes=10,
        init_values=0.3,
    )
    weights = Teacher(vit).save(tmp_path / "teacher.safetensors")
    run_dir = tmp_path / "run"
    config = tmp_path / "phases.yaml"
    config.write_text(
        f"run_dir: {run_dir}\n"
        f"teacher: {{weights: {weights}}}\n"
        f"data: {{source: shards, shards_dir: {digits_shards}, num_workers: 0, batch_size: 16,"
        " transform: {input_size: 8, crop_pct: 1.0}}\n"
        f"phases: {{ks: [2, 3], num_images: 40, method: {method}, split: {split},"
        " token_mode: all, random_partitions: 3}\n"
        "logging: {wandb: disabled}\n"
    )
    assert cli_main(["phases", str(config), "phases.min_length=2"]) == 0
    printed = capsys.readouterr().out

    result = json.loads((run_dir / "phases.json").read_text())
    sim = np.load(run_dir / "similarity.npy")
    assert (run_dir / "phases.png").stat().st_size > 0
    assert result["num_layers"] == 6 and result["num_images"] == 40 and sim.shape == (6, 6)
    assert (result["method"], result["split"], result["min_split"]) == (method, split, 4)

    cfg = load_config(config, ["phases.min_length=2"])
    teacher = Teacher.from_config(cfg.teacher)
    data = ShardDataModule(cfg.data, teacher.data_config)
    loader = data.train_dataloader() if split == "train" else data.val_dataloader()
    images = torch.cat([b["image"][b["valid"]] for b in itertools.islice(loader, 3)])[:40]
    np.testing.assert_allclose(
        sim, _reference_similarity(teacher.trajectory(images), "all", None), atol=1e-6
    )
    other = "bisect" if method == "dp" else "dp"
    for k in ("2", "3"):
        expected = {m: _expected_partition(sim, int(k), m, 2) for m in ("dp", "bisect")}
        assert result["partitions"][k] == expected[method]
        for m in ("dp", "bisect"):
            found = result["objectives"][k][m]
            assert found["boundaries"] == expected[m]
            assert found["within"] == pytest.approx(_within(sim, expected[m]), abs=1e-9)
        line = next(x for x in printed.splitlines() if x.startswith(f"k={k}: "))
        assert line.index(f"{method} {expected[method]}") < line.index(f"{other} {expected[other]}")
        assert len(result["random"][k]) == 3
        assert all(min(len(s) for s in _segments(b, 6)) >= 2 for b in result["random"][k])
    assert result["cut"]["3"] >= max(result["random_cut"]["3"]) - 1e-12

    stamp = (run_dir / "phases.json").stat().st_mtime_ns
    assert discover_phases(cfg, run_dir) == result  # skipped: phases.json exists
    assert (run_dir / "phases.json").stat().st_mtime_ns == stamp
