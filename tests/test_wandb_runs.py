"""W&B runs of a pipeline, read back from the offline run files with wandb's own record
protobufs: one group, a job type and readable name per step, summary reductions, the
per-layer fidelity table and plot, headline numbers, and the artifact lineage teacher ->
phases -> stage 1 -> stage 2 -> eval -> export (its model card reads the evaluation); then
`raptor sync` on the pipeline root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raptor.cli import main as cli_main
from raptor.commands.sync import read_records


def run_files(folder: Path) -> dict:
    """What the offline runs of one step folder wrote, from their records."""
    out = {"runs": [], "metrics": {}, "summary": {}, "logged": [], "used": [], "tables": set()}
    for path in sorted(folder.glob("wandb/offline-run-*/*.wandb")):
        for rec in read_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["runs"].append(rec.run)
            elif kind == "metric" and rec.metric.glob_name:
                out["metrics"][rec.metric.glob_name] = rec.metric
            elif kind == "summary":
                for item in rec.summary.update:
                    key = "/".join(item.nested_key) or item.key
                    out["summary"][key] = json.loads(item.value_json)
            elif kind == "artifact":
                art = rec.artifact
                if art.type == "run_table":
                    out["tables"].add(art.name)
                else:
                    entries = {e.path: e.local_path for e in art.manifest.contents}
                    target = out["used"] if art.use_after_commit else out["logged"]
                    target.append((art.name, art.type, entries))
    return out


@pytest.mark.slow
def test_pipeline_wandb_runs_have_group_jobs_summary_tables_and_lineage(
    demo_pipeline, tmp_path, capsys, monkeypatch
):
    run, _, out = demo_pipeline
    assert f"raptor sync {run}" in out

    steps = {
        "teacher": (run / "teacher", "model", run / "teacher" / "teacher.safetensors"),
        "phases": (run / "phases", "phases", run / "phases" / "phases.json"),
        "k2/stage1": (run / "k2/stage1", "model", run / "k2/stage1/checkpoints/last.ckpt"),
        "k2/stage2": (run / "k2/stage2", "model", run / "k2/stage2/checkpoints/last.ckpt"),
        "k2/eval": (run / "k2/eval", "evaluation", run / "k2/eval/eval.json"),
        "k2/export": (run / "k2/export", "model", run / "k2/export/backbone/config.json"),
        "probe/cls": (run / "probe/cls", "evaluation", run / "probe/cls/probe.json"),
        "analyze": (run / "analysis", "analysis", run / "analysis/analysis.json"),
    }
    files = {name: run_files(folder) for name, (folder, _, _) in steps.items()}
    for name, got in files.items():
        job = "probe" if name.startswith("probe/") else name.split("/")[-1]
        assert {r.run_group for r in got["runs"]} == {"demo"}, name
        assert {r.job_type for r in got["runs"]} == {job}, name
        assert {r.display_name for r in got["runs"]} == {f"demo/{name}"}, name
        assert "teacher:vit_tiny_patch16_224" in got["runs"][0].tags or got["runs"][0].tags
        # its own output, named like the run, pointing at the file in its folder
        kind, path = steps[name][1], steps[name][2]
        [(art, art_type, entries)] = got["logged"]
        assert (art, art_type) == (f"demo-{name.replace('/', '-')}", kind), name
        assert str(path) in entries.values(), (name, entries)

    # lineage: each step uses exactly the artifacts of the steps it consumes
    def used(name):
        return sorted(a for a, _, _ in files[name]["used"])

    assert used("teacher") == []
    assert used("phases") == ["demo-teacher"]
    assert used("k2/stage1") == ["demo-phases", "demo-teacher"]
    assert used("k2/stage2") == ["demo-k2-stage1", "demo-phases", "demo-teacher"]
    assert used("k2/eval") == ["demo-k2-stage2", "demo-phases", "demo-teacher"]
    assert used("k2/export") == ["demo-k2-eval", "demo-k2-stage2"]  # the card reads eval.json
    assert used("probe/cls") == ["demo-k2-stage2", "demo-phases", "demo-teacher"]
    assert used("analyze") == ["demo-k2-stage2", "demo-phases", "demo-teacher"]
    # a used artifact has the same content (digest) as the one its producer logged
    logged = {a: e for f in files.values() for a, _, e in f["logged"]}
    for f in files.values():
        for a, _, e in f["used"]:
            assert e == logged[a]

    stage2 = files["k2/stage2"]
    tags = set(stage2["runs"][0].tags)
    boundaries = json.loads((run / "phases" / "phases.json").read_text())["partitions"]["2"]
    assert {"k=2", "phases=" + ",".join(map(str, boundaries))} <= tags, tags
    assert any(t.startswith("teacher:") for t in tags)
    # summary reductions and the step metric of validation metrics
    assert stage2["metrics"]["val/r2*"].summary.max
    assert stage2["metrics"]["val/loss*"].summary.min
    assert stage2["metrics"]["val/top1*"].summary.last
    assert stage2["metrics"]["val/r2*"].step_metric == "trainer/global_step"
    # per-layer table and plot at the validation; headline numbers as the eval computed them
    ev = json.loads((run / "k2" / "eval" / "eval.json").read_text())
    summary = files["k2/eval"]["summary"]
    assert files["k2/eval"]["tables"] and stage2["tables"]
    assert summary["val/fidelity/nrows"] == len(ev["layers"]) * len(ev["student"]["r2"])
    for group, values in ev["student"]["r2"].items():
        assert summary[f"final/r2_{group}"] == pytest.approx(values[-1])
    assert summary["final/top1_ratio"] == pytest.approx(ev["top1"]["ratio"])
    assert stage2["summary"]["final/img_s"] > 0
    # the config is the run config
    config = {u.key: json.loads(u.value_json) for u in stage2["runs"][0].config.update}
    assert config["model"]["k"] == 2 and config["name"] == "demo"

    # raptor sync: lists every current run, calls `wandb sync` on them, reports uploads
    assert cli_main(["sync", str(run), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "would upload 8 offline run(s)" in listed
    [line] = [x for x in listed.splitlines() if "demo/k2/stage2 (stage2)" in x]
    assert line.endswith("logs demo-k2-stage2; uses demo-teacher, demo-phases, demo-k2-stage1")
    fake = tmp_path / "bin" / "wandb"
    fake.parent.mkdir()
    log = tmp_path / "wandb_args.txt"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'shift; for d in "$@"; do for f in "$d"/*.wandb; do touch "$f.synced"; done; done\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert cli_main(["sync", str(run)]) == 0
    said = capsys.readouterr().out
    synced = sorted(run.glob("**/wandb/offline-run-*"))
    assert log.read_text().split() == ["sync", *map(str, synced)]
    assert f"uploaded {len(synced)} of {len(synced)} run(s)" in said
