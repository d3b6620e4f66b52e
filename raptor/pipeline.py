"""`raptor pipeline CONFIG [--plan]`: the whole job, one sub-folder per step, resumable.

In run_dir (default runs/NAME), the layout of `raptor.run_folders`, which every command
reads and writes by default too:
    shards/    webdataset shards   (when data.source is digits or imagefolder:PATH; in
               runs/NAME/shards, or data.shards_dir, whatever run_dir is)
    teacher/   small teacher       (when teacher.train_from_scratch and no teacher.weights)
    phases/    similarity matrix, phases.json, heat-map
    k{K}/stage1, k{K}/stage2, k{K}/eval, k{K}/export   for every K in pipeline.ks
               (`train.stages` [1] or [2]: only that stage, evaluated and exported)
    probe/TASK for every task in pipeline.probes: the teacher, every Raptor and the
               baselines probed side by side (`raptor probe`); probe/cache their features
    analysis/  dynamics of the teacher and every Raptor (when pipeline.analyze)
    config.yaml, summary.md, summary.json, *.png

Results cannot go stale. Each step depends on the config keys listed for it in `DEPENDS`
(the files named by teacher.weights, teacher.head and phases.file count by their
content) and on the input hashes of the steps it consumes (`after`), so a change
reaches everything downstream. When a step starts it records those values and their
hash in `inputs.json`; `step.json` (written last, with the result and wall time) marks it
complete. On every run the pipeline first prints its plan, step by step:
- skip:   complete, with the same input hash;
- run:    never started, or interrupted with the same input hash (training resumes
          from its last checkpoint), or a folder without an input record (the step reuses
          or resumes what is there);
- rerun:  its inputs changed; the plan names the changed keys (old -> new) or the
          upstream steps. The old folder is moved aside to `NAME.stale-STAMP` (never
          mixed with, or resumed into, the new run), the root config.yaml and summary
          to `run.stale-STAMP/`.
Keys in `NO_RESULT_KEYS` (logging, devices, threads, workers, checkpoint cadence...)
never rerun anything. `--plan` prints the plan and stops, to check a change first.
The root config.yaml is written when every step is complete, so it describes the
results in the folder; each step folder keeps its own config.yaml as well.
On several devices (trainer.devices > 1: Lightning starts the other ranks at the first
training step, and they run the pipeline from there) every rank takes each step in turn,
with a barrier after it; rank 0 writes the step files, config.yaml and the summary; the
phases and the analysis are rank 0's, the probes' features are shared by the ranks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from raptor.config import save_config
from raptor.distributed import barrier, is_rank_zero
from raptor.errors import read_json
from raptor.eval.phases import PHASES_FILE
from raptor.eval.summary import report_files, write_summary
from raptor.run_folders import RunFolders, absolute_paths, run_folders
from raptor.train.runs import log_lineage

STEP_FILE = "step.json"  # written last: the step is complete
INPUTS_FILE = "inputs.json"  # written first: what the step's folder was made from
CONFIG_FILE = "config.yaml"
MAX_LISTED = 8  # changed keys the plan lists per step

# Config keys each kind of step depends on: a key names a leaf or a whole section, "!key"
# leaves it out. Steps consume data, teacher and phases either from an upstream step
# (then they depend on its hash) or as given in the config (the `given_*` entries).
_FIT = ("train.seed", "train.val_batches", "trainer.precision", "trainer.extra")
_DMD = ("dmd", "!dmd.log_groups", "!dmd.eval_images", "!dmd.sweep")
DEPENDS: Dict[str, Tuple[str, ...]] = {
    "shards": ("data.source", "data.shard_size", "data.val_fraction", "data.split_seed")
    + ("data.store_crop",),
    # how every step reads its images
    "data": ("data.batch_size", "data.val_batch_size", "data.shuffle_buffer", "data.seed")
    + ("data.train_samples", "data.val_samples", "data.require_labels", "data.transform"),
    "given_data": ("data.source", "data.shards_dir", "data.train_urls", "data.val_urls"),
    "teacher": (
        "teacher",
        "!teacher.precision",
        "train.seed",
        "trainer.precision",
        "trainer.extra",
    ),
    "given_teacher": ("teacher", "!teacher.train"),
    "phases": ("phases", "!phases.boundaries", "!phases.file"),
    "given_phases": ("phases.boundaries", "phases.file"),
    "stage1": ("model", "train.stage1", "train.blocks") + _FIT,
    "stage2": ("model", "train.stage2") + _FIT + _DMD,
    "eval": ("trainer.precision", "trainer.extra") + _DMD,
    "export": ("export.onnx", "export.onnx_opset"),
    # dense probes on the digits generate their scenes (raptor.eval.probe.run.probe_data)
    "probe": ("probe", "!probe.task", "!probe.cache_dir", "trainer.precision", "data.scene_count")
    + ("data.scene_size", "data.scene_digits"),
    "analyze": ("analyze", "!analyze.models", "trainer.precision"),
}
# Keys no step's results depend on: changing them reruns nothing. With DEPENDS these cover
# every key of the schema (tests/test_pipeline.py checks), so a new key must be placed.
NO_RESULT_KEYS = (
    "name",
    "run_dir",
    "logging",
    "pipeline",  # which steps exist, not what they compute
    "data.num_workers",
    "data.decode",  # where JPEGs are decoded (CPU workers or the device), not what comes out
    "data.allow_pipe",
    "data.max_bad_fraction",  # when to give up, not what is computed
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.deterministic",
    "trainer.benchmark",
    "trainer.num_threads",
    "train.stage",  # set by the pipeline per step
    "train.stages",  # which stage steps exist; what each consumes reaches its hash (`after`)
    "train.init_from",  # set by the pipeline: stage 2 starts from stage 1 (its hash)
    "train.resume",
    "train.schedule_change",  # how a resume in place treats a changed schedule; a rerun starts fresh
    "train.ckpt_every_n_steps",
    "train.val_every_n_steps",  # the reported metrics come from a final validation
    "dmd.log_groups",
    "dmd.eval_images",  # `raptor dmd` only
    "dmd.sweep",  # `raptor dmd` only
    "export.out",  # the pipeline exports into k{K}/export/backbone
    "export.overwrite",
    "probe.task",  # set by the pipeline per probe step (pipeline.probes)
    "probe.cache_dir",  # where features are cached; a cache is reused only when it matches
    "analyze.models",  # `raptor analyze` only: the pipeline analyses its own Raptors
)
# Keys naming a file: their value in a record is the file's content hash, not its path.
FILE_KEYS = ("teacher.weights", "teacher.head", "phases.file")


# --------------------------------------------------------------------------- input records


def _file_digest(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        return f"missing: {path}"
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _leaves(node: Any, prefix: str = "") -> Dict[str, Any]:
    """Dotted key -> value of every leaf of a plain container (empty sections kept as {})."""
    if isinstance(node, dict) and node:
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _selected(key: str, spec: Tuple[str, ...]) -> bool:
    def hit(pattern: str) -> bool:
        return key == pattern or key.startswith(pattern + ".")

    return any(hit(p) for p in spec if p[0] != "!") and not any(
        hit(p[1:]) for p in spec if p[0] == "!"
    )


def depend_values(cfg: DictConfig, spec: Tuple[str, ...]) -> Dict[str, Any]:
    """The values of the config keys that `spec` selects (files by content hash)."""
    leaves = _leaves(OmegaConf.to_container(cfg, resolve=True))
    out = {k: v for k, v in leaves.items() if _selected(k, spec)}
    for k in FILE_KEYS:
        if out.get(k):
            out[k] = _file_digest(str(out[k]))
    return out


def _hash(values: Dict[str, Any], after: Dict[str, str]) -> str:
    text = json.dumps({"values": values, "after": after}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(path: Path) -> Optional[Dict[str, Any]]:
    return read_json(path, "pipeline step record") if path.is_file() else None


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- steps


@dataclass
class Step:
    """One pipeline step: its folder, the config values and upstream steps its results
    depend on, and `run(done, folder)` -> result, given the records of the steps done;
    `job`: its W&B job type (none for shards) and `cfg` the config it reads (model.k set)."""

    name: str
    folder: Path
    values: Dict[str, Any]
    after: Tuple[str, ...]
    run: Callable[[Dict[str, Dict[str, Any]], Path], Dict[str, Any]]
    hash: str = ""
    job: str = ""
    cfg: Optional[DictConfig] = None


def _with(cfg: DictConfig, **updates: Any) -> DictConfig:
    """A copy of cfg with dotted-key updates (`_with(cfg, **{"train.stage": 2})`)."""
    new = copy.deepcopy(cfg)
    for key, value in updates.items():
        OmegaConf.update(new, key, value, merge=False)
    return new


def pipeline_steps(cfg: DictConfig, root: Path) -> List[Step]:
    """Every step of the module docstring, in order, with what it depends on, in the
    folders `raptor.run_folders` gives under `root`."""
    steps: List[Step] = []
    folders = run_folders(cfg, root)

    def add(name, folder, keys, after, run, source: DictConfig = cfg, job: str = "") -> None:
        """Append a step depending on `keys` of `source` and on the steps `after`."""
        values = depend_values(source, keys)
        steps.append(Step(name, Path(folder), values, tuple(after), run, job=job, cfg=source))

    def folder(name: str) -> Path:
        """Where step `name` runs now (a study may move shared steps: raptor.study.share)."""
        return next(s.folder for s in steps if s.name == name)

    def given(done: Dict[str, Dict[str, Any]], **updates: Any) -> DictConfig:
        """cfg with what the finished upstream steps provide, plus `updates`."""
        new = {}
        if "shards" in done:
            new.update({"data.source": "shards", "data.shards_dir": str(folder("shards"))})
        if "teacher" in done:
            new["teacher.weights"] = done["teacher"]["result"]["weights"]
        if "phases" in done:
            new["phases.file"] = str(folder("phases") / PHASES_FILE)
        return _with(cfg, **new, **updates)

    data, teacher, phases = DEPENDS["data"], DEPENDS["given_teacher"], DEPENDS["given_phases"]
    inputs: List[str] = []  # upstream steps every later step consumes
    shards_dir = folders.shards
    if cfg.data.source != "shards":
        from raptor.data.shards import ensure_shards

        add(
            "shards",
            shards_dir,
            DEPENDS["shards"],
            [],
            # the folder holds this step's inputs.json, and partial shards when interrupted
            lambda done, folder: {
                "shards_dir": ensure_shards(cfg, folder, overwrite=True).data.shards_dir
            },
        )
        inputs.append("shards")
    else:
        data += DEPENDS["given_data"]

    if cfg.teacher.train_from_scratch and not cfg.teacher.weights:
        from raptor.train.teacher import train_teacher

        add(
            "teacher",
            folders.teacher,
            data + DEPENDS["teacher"],
            inputs,
            lambda done, folder: train_teacher(given(done, run_dir=str(folder)), folder),
            job="teacher",
        )
        teacher, inputs = (), inputs + ["teacher"]

    if cfg.phases.boundaries is None and not cfg.phases.file:
        from raptor.eval.phases import discover_phases

        add(
            "phases",
            folders.phases,
            data + teacher + DEPENDS["phases"],
            inputs,
            lambda done, folder: discover_phases(given(done, run_dir=str(folder)), folder),
            job="phases",
        )
        phases, inputs = (), inputs + ["phases"]

    for k in cfg.pipeline.ks:
        raptor_steps(
            add,
            given,
            _with(cfg, **{"model.k": k}),
            folders,
            data + teacher + phases,
            inputs,
        )
    # the run each Raptor's evaluation reads: what the probes and the analysis read too
    finals = [f"k{k}/stage{2 if 2 in cfg.train.stages else 1}" for k in cfg.pipeline.ks]
    if cfg.pipeline.probes:
        from raptor.eval.probe.run import run_probe

        for task in cfg.pipeline.probes:
            add(
                f"probe/{task}",
                folders.probe(task),
                data + teacher + phases + DEPENDS["probe"],
                inputs + finals,
                lambda done, folder, task=task: run_probe(
                    given(done, **{"probe.task": task, "run_dir": str(folder)}), folder, root
                ),
                source=_with(cfg, **{"probe.task": task}),
                job="probe",
            )
    if cfg.pipeline.analyze:
        from raptor.eval.dynamics.run import run_analysis

        add(
            "analyze",
            folders.analysis,
            data + teacher + DEPENDS["analyze"],
            inputs + finals,
            lambda done, folder: run_analysis(
                given(done, run_dir=str(folder)),
                ["teacher"] + [done[f]["result"]["checkpoint"] for f in finals],
                folder,
            ),
            job="analyze",
        )
    return steps


def raptor_steps(
    add, given, cfg: DictConfig, folders: RunFolders, reads, inputs: List[str]
) -> None:
    """Stage 1 and stage 2 (those of `train.stages`), evaluation and export of the Raptor
    with k = cfg.model.k, in its `folders`: `add`s them to the pipeline's steps. The
    evaluation and export take the last stage run (stage 1 alone: all its blocks as one
    rollout; stage 2 alone: trained from fresh blocks). `reads` are the data/teacher/phases
    keys and `inputs` the upstream steps every one consumes."""
    from raptor.eval.fidelity import evaluate
    from raptor.train.export import export_backbone
    from raptor.train.fit import fit

    k, stages = cfg.model.k, sorted(set(cfg.train.stages))

    def add_k(*args, job: str) -> None:  # values read from this Raptor's config (model.k = k)
        add(*args, source=cfg, job=job)

    s1, s2 = folders.stage(k, 1), folders.stage(k, 2)
    n1, n2 = f"k{k}/stage1", f"k{k}/stage2"
    last, final = (s2, n2) if 2 in stages else (s1, n1)  # what is evaluated and exported

    def stage2_cfg(done: Dict[str, Dict[str, Any]], **updates: Any) -> DictConfig:
        """The stage-2 config (also the evaluation's: the whole rollout's losses)."""
        init = str(s1) if 1 in stages else ""
        return given(done, **{"model.k": k, "train.stage": 2, "train.init_from": init}, **updates)

    if 1 in stages:
        add_k(
            n1,
            s1,
            reads + DEPENDS["stage1"],
            inputs,
            lambda done, folder: fit(
                given(done, **{"model.k": k, "train.stage": 1, "run_dir": str(folder)}), folder
            ),
            job="stage1",
        )
    if 2 in stages:
        add_k(
            n2,
            s2,
            reads + DEPENDS["stage2"],
            inputs + ([n1] if 1 in stages else []),
            lambda done, folder: fit(stage2_cfg(done, run_dir=str(folder)), folder),
            job="stage2",
        )
    if cfg.pipeline.evaluate:
        add_k(
            f"k{k}/eval",
            folders.eval(k),
            reads + DEPENDS["eval"],
            inputs + [final],
            lambda done, folder: evaluate(
                stage2_cfg(done, run_dir=str(folder)), done[final]["result"]["checkpoint"], folder
            ),
            job="eval",
        )
    if cfg.pipeline.export:
        add_k(
            f"k{k}/export",
            folders.export(k),
            DEPENDS["export"],
            [final] + ([f"k{k}/eval"] if cfg.pipeline.evaluate else []),  # the card shows it
            lambda done, folder: {
                "dir": str(
                    export_backbone(
                        last,
                        folder / "backbone",
                        onnx=cfg.export.onnx,
                        overwrite=True,
                        opset=cfg.export.onnx_opset,
                    )
                )
            },
            job="export",
        )


# --------------------------------------------------------------------------- plan and run


def plan_steps(steps: List[Step]) -> Dict[str, Tuple[str, List[str]]]:
    """Step name -> (skip | run | rerun, reasons), from the records in the step folders.
    Fills each step's `hash` (its values and its upstream steps' hashes)."""
    hashes: Dict[str, str] = {}
    reruns: set = set()
    plan: Dict[str, Tuple[str, List[str]]] = {}
    for step in steps:
        after = {name: hashes[name] for name in step.after}
        step.hash = hashes[step.name] = _hash(step.values, after)
        record = _read(step.folder / INPUTS_FILE)
        complete = (step.folder / STEP_FILE).is_file()
        if record is None:
            used = step.folder.is_dir() and any(step.folder.iterdir())
            why = "no input record: reuses or resumes what its folder holds" if used else "new"
            plan[step.name] = ("run", [why])
        elif record["hash"] == step.hash:
            plan[step.name] = ("skip", ["complete"]) if complete else ("run", ["resumes"])
        else:
            old = record.get("values", {})
            why = [
                f"{key}: {_show(old.get(key, '(unset)'))} -> {_show(step.values.get(key, '(unset)'))}"
                for key in sorted(set(old) | set(step.values))
                if old.get(key, "(unset)") != step.values.get(key, "(unset)")
            ]
            if len(why) > MAX_LISTED:
                why[MAX_LISTED - 1 :] = [f"... and {len(why) - MAX_LISTED + 1} more keys"]
            why += [
                f"{name} reruns" if name in reruns else f"input from {name} changed"
                for name in step.after
                if record.get("after", {}).get(name) != after[name]
            ]
            plan[step.name] = ("rerun", why or ["its inputs changed"])
            reruns.add(step.name)
    return plan


def print_plan(plan: Dict[str, Tuple[str, List[str]]], steps: List[Step], stamp: str) -> None:
    """One line per step and reason, then where the folders of the steps that rerun go."""
    width = max(len(s.name) for s in steps)
    print("[pipeline] plan:")
    for step in steps:
        action, why = plan[step.name]
        print(f"  {step.name:<{width}}  {action:<5}  {why[0]}")
        for line in why[1:]:
            print(f"  {'':<{width}}  {'':<5}  {line}")
    for step in steps:
        if plan[step.name][0] == "rerun":
            print(f"[pipeline] {step.name}: old folder goes to {_stale(step.folder, stamp)}")


def _stale(path: Path, stamp: str) -> Path:
    return path.with_name(f"{path.name}.stale-{stamp}")


def run_step(
    step: Step, action: str, done: Dict[str, Dict[str, Any]], upstream: List[Step] = ()
) -> Dict[str, Any]:
    """Run `step` unless the plan skips it; returns its record (step.json's content:
    {"step", "folder", "hash", "wall_s", "result"}). A step run logs its W&B lineage: its
    output artifact, and those of the `upstream` steps (those it consumes) as its inputs."""
    if action == "skip":
        print(f"[pipeline] {step.name}: complete, skipped ({step.folder})")
        return _read(step.folder / STEP_FILE)
    print(f"[pipeline] {step.name}: running in {step.folder}")
    rank0 = is_rank_zero()
    if rank0:
        step.folder.mkdir(parents=True, exist_ok=True)
        (step.folder / STEP_FILE).unlink(missing_ok=True)
        inputs = {"hash": step.hash, "values": step.values, "after": {}}
        inputs["after"] = {name: done[name]["hash"] for name in step.after}
        (step.folder / INPUTS_FILE).write_text(json.dumps(inputs, indent=1, default=str))
    start = time.perf_counter()
    result = step.run(done, step.folder)
    if step.job:
        used = [(s.cfg, s.job, s.folder) for s in upstream if s.job]
        log_lineage(step.cfg, step.job, step.folder, used)
    record = {
        "step": step.name,
        "folder": str(step.folder),
        "hash": step.hash,
        "wall_s": round(time.perf_counter() - start, 1),
        "result": result,
    }
    if rank0:
        (step.folder / STEP_FILE).write_text(json.dumps(record, indent=2, default=str))
    barrier()  # under DDP no rank starts the next step before rank 0 has written this one's files
    return record


def run_pipeline(
    cfg: DictConfig, plan_only: bool = False, shared: Optional[Path] = None
) -> Optional[Dict[str, Any]]:
    """Plan every step of the module docstring, print the plan, move the folders of steps
    that rerun aside, then run them in order; returns `write_summary`'s result (None with
    `plan_only`, and on the ranks other than 0 of a DDP pipeline). With `shared` (a
    study's cells), the shards, teacher and phases steps live in that folder by input
    hash and run under a lock (`raptor.study.share`)."""
    cfg = absolute_paths(cfg)
    root = run_folders(cfg, cfg.run_dir or None).root
    cfg.run_dir = str(root)
    steps = pipeline_steps(cfg, root)
    plan = plan_steps(steps)
    run = run_step
    if shared is not None:
        from raptor.study.share import share_steps

        plan, run = share_steps(steps, Path(shared))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print_plan(plan, steps, stamp)
    reruns = [s.folder for s in steps if plan[s.name][0] == "rerun"]
    report = [root / CONFIG_FILE] if (root / CONFIG_FILE).is_file() else []
    report += report_files(root)
    if reruns and report:  # they describe the results being replaced
        print(f"[pipeline] old config.yaml and summary go to {_stale(root / 'run', stamp)}")
    if plan_only:
        print("[pipeline] --plan: nothing was run or moved")
        return None
    if is_rank_zero():  # other ranks re-run the pipeline into the folders rank 0 made
        for path in reruns:
            shutil.move(str(path), str(_stale(path, stamp)))
        if reruns and report:
            _stale(root / "run", stamp).mkdir(parents=True)
            for path in report:
                shutil.move(str(path), str(_stale(root / "run", stamp) / path.name))

    done: Dict[str, Dict[str, Any]] = {}
    by_name = {s.name: s for s in steps}
    for step in steps:
        upstream = [by_name[name] for name in step.after]
        done[step.name] = run(step, plan[step.name][0], done, upstream)
    if not is_rank_zero():  # the other ranks of a DDP pipeline: rank 0 reports
        return None
    save_config(cfg, root, CONFIG_FILE)  # every step is complete: it describes them
    return write_summary(cfg, root, done)
