"""Phase discovery: partitions vs brute force and a naive bisection, the streamed
similarity vs a float64 computation on all data, phases files, the matrix CLI."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_vit

from raptor.cli import main as cli_main
from raptor.eval.phases import (
    LayerSimilarity,
    cut_value,
    dissimilarity,
    partition,
    random_partitions,
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


def _naive_bisect(sim, k, min_length):
    """Transcription of the definition: split the segment whose best contiguous
    two-way split has the largest crossing dissimilarity, until k segments;
    ties -> earliest split point, then earliest segment. A split is admissible
    when k segments of >= min_length layers can still be reached."""
    L = sim.shape[0]
    segments = [list(range(1, L + 1))]
    while len(segments) < k:
        candidates = []  # (value, segment position, split position)
        for pos, seg in enumerate(segments):
            best = None
            for c in range(min_length, len(seg) - min_length + 1):
                left, right = seg[:c], seg[c:]
                after = segments[:pos] + [left, right] + segments[pos + 1 :]
                if sum(len(s) // min_length for s in after) < k:
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
def test_bisect_equals_naive_transcription(L, k, min_length):
    rng = np.random.default_rng(7 + 100 * L + 10 * k + min_length)
    for trial in range(3):
        sim = _random_similarity(rng, L, symmetric=trial != 2)
        assert partition(sim, k, "bisect", min_length=min_length) == _naive_bisect(
            sim, k, min_length
        )
    flat = np.ones((L, L))  # every split ties
    assert partition(flat, k, "bisect", min_length=min_length) == _naive_bisect(flat, k, min_length)


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
def test_matrix_cli_prints_boundaries_json(tmp_path, capsys, method):
    rng = np.random.default_rng(0)
    sim = _block_similarity(rng, [3, 2, 3])
    np.save(tmp_path / "s.npy", sim)
    np.savetxt(tmp_path / "d.txt", 1 - sim)
    rc = cli_main(["phases", "--matrix", str(tmp_path / "s.npy"), "--k", "3", "--method", method])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"boundaries": partition(sim, 3, method)}
    if method == "dp":  # the block structure; bisect's unnormalised cuts favour [3, 4] here
        assert printed == {"boundaries": [3, 5]}
    argv = ["phases", "--matrix", str(tmp_path / "d.txt"), "--kind", "distance", "--k", "2"]
    assert cli_main([*argv, "--method", method]) == 0
    expected = partition(sim, 2, method)
    assert json.loads(capsys.readouterr().out) == {"boundaries": expected}
    assert cli_main([*argv, "--method", method, "--min-length", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"boundaries": [4]}


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


def test_discover_phases_end_to_end(tmp_path, digits_shards, capsys):
    """`raptor phases CONFIG` on digits shards with a tiny saved teacher: the matrix
    equals a float64 computation on the same images, the files are written, and a
    second run is skipped."""

    from raptor.config import load_config
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
        "phases: {ks: [2, 3], num_images: 40, method: dp, token_mode: all, random_partitions: 3}\n"
        "logging: {wandb: disabled}\n"
    )
    assert cli_main(["phases", str(config), "phases.min_length=2"]) == 0
    printed = capsys.readouterr().out
    assert "k=3: boundaries" in printed

    result = json.loads((run_dir / "phases.json").read_text())
    sim = np.load(run_dir / "similarity.npy")
    assert (run_dir / "phases.png").stat().st_size > 0
    assert result["num_layers"] == 6 and result["num_images"] == 40 and sim.shape == (6, 6)

    cfg = load_config(config, ["phases.min_length=2"])
    teacher = Teacher.from_config(cfg.teacher)
    data = ShardDataModule(cfg.data, teacher.data_config)
    images = torch.cat([b["image"][b["valid"]] for b in data.val_dataloader()])[:40]
    np.testing.assert_allclose(
        sim, _reference_similarity(teacher.trajectory(images), "all", None), atol=1e-6
    )
    for k in ("2", "3"):
        assert result["partitions"][k] == _brute_force(sim, int(k), 2)[1]
        assert len(result["random"][k]) == 3
        assert all(min(len(s) for s in _segments(b, 6)) >= 2 for b in result["random"][k])
    assert result["cut"]["3"] >= max(result["random_cut"]["3"]) - 1e-12

    stamp = (run_dir / "phases.json").stat().st_mtime_ns
    assert discover_phases(cfg, run_dir) == result  # skipped: phases.json exists
    assert (run_dir / "phases.json").stat().st_mtime_ns == stamp
