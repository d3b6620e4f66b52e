"""The model card (README.md) of an exported backbone, rendered from its config.json alone,
so `save_pretrained` and `push_to_hub` write the same card wherever the backbone goes.

Sections: what the model is (teacher, partition, k), the teacher's weights, training
(stages, steps, data), the evaluation (top-1 and per-layer R^2 of the Raptor next to the
identity and DMD baselines, and the fidelity plot) when `config["evaluation"]` holds one,
how to load it, integrity (weights' sha256, self-test) and the papers to cite.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

PAPERS = (
    "*Block-Recurrent Dynamics in Vision Transformers* (Raptor), ICLR 2026, "
    "https://openreview.net/forum?id=gH3HhnfWLC; code: https://github.com/KempnerInstitute/raptor",
    "*Dynamic Mode Decomposition along Depth in Vision Transformers*, arXiv:2605.07556",
)


def r2_text(x: Optional[float]) -> str:
    """An R^2 as the card prints it (4 decimals; n/a for a layer a baseline does not predict)."""
    return "n/a" if x is None else f"{x:.4f}"


def pct_text(x: Optional[float]) -> str:
    """An accuracy as the card prints it (percent, 2 decimals)."""
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _phases(config: Dict[str, Any]) -> str:
    blocks = config["phases"]["layers_of_block"]
    return ", ".join(f"block {j + 1}: layers {b[0]}-{b[-1]}" for j, b in enumerate(blocks))


def _training(source: Dict[str, Any]) -> List[str]:
    lines = [
        f"- exported checkpoint(s): {', '.join(f'`{c}`' for c in source['checkpoints'])} "
        f"(stage {source['stage']}, optimizer step {source['global_step']})",
    ]
    train = source.get("training")
    if train:
        steps = ", ".join(f"stage {s}: {train['steps'][str(s)]} steps" for s in train["stages"])
        data = train["data"]
        lines += [
            f"- stages trained: {steps}",
            f"- data: `{data['source']}`, `{data['where']}`; batch {data['batch_size']} per device "
            f"on {data['devices']} device(s) x {data['nodes']} node(s)",
        ]
    return lines


def _evaluation(ev: Optional[Dict[str, Any]]) -> List[str]:
    if not ev:
        return ["Not evaluated: no `raptor eval` result (eval.json) was found for this run."]
    lines = [
        f"From `{ev['file']}`: {ev['images']} validation images"
        + ("" if ev.get("complete", True) else " (incomplete: some samples were missing)")
        + ".",
        "",
    ]
    top1 = ev.get("top1")
    if top1:
        lines += _table(
            ["teacher top-1", "Raptor top-1", "ratio"],
            [
                [
                    pct_text(top1["teacher"]),
                    pct_text(top1["student"]),
                    "n/a" if top1["ratio"] is None else f"{top1['ratio']:.4f}",
                ]
            ],
        )
        lines.append("")
    columns = list(ev["r2"])
    rows = [
        [str(layer)] + [r2_text(ev["r2"][c][i]) for c in columns]
        for i, layer in enumerate(ev["layers"])
    ]
    lines += ["Per-layer R^2 (all tokens) against the teacher's hidden states:", ""]
    lines += _table(["layer"] + columns, rows)
    lines += [
        "",
        "identity: a_l predicted as a_0; DMD: linear operators fitted along the teacher's "
        "depth (n/a: a layer the map does not predict).",
    ]
    if ev.get("plot"):
        lines += ["", f"![per-layer fidelity]({ev['plot']})"]
    return lines


def model_card(config: Dict[str, Any]) -> str:
    """README.md text (YAML metadata, then markdown) for a backbone's config dict."""
    arch, teacher, source = config["architecture"], config.get("teacher", {}), config["source"]
    k, layers = len(config["phases"]["layers_of_block"]), arch["num_layers"]
    name = teacher.get("name", "a ViT")
    prep = config["preprocessing"]
    test = config.get("self_test", {})
    lines = [
        "---",
        "library_name: raptor",
        "pipeline_tag: image-feature-extraction",
        "tags: [raptor, block-recurrent, vision-transformer]",
        "---",
        "",
        f"# Raptor k={k} of `{name}` (run `{source.get('run_name', '?')}`)",
        "",
        f"A block-recurrent approximation of the ViT `{name}`: its {layers} blocks replaced by "
        f"k={k} weight-tied blocks applied recurrently over contiguous phases of depth "
        f"({_phases(config)}; boundaries {config['phases']['boundaries']}), between the "
        "teacher's own patch embedding and final norm. Width "
        f"{arch['dim']}, {arch['num_heads']} heads, depth conditioning "
        f"{'on' if config['depth_conditioning']['enabled'] else 'off'}.",
        "",
        "## Teacher",
        "",
        f"- architecture: `{name}` (timm)",
        f"- weights: {teacher.get('weights', 'not recorded')}",
        "",
        "## Training",
        "",
        *_training(source),
        "",
        "## Evaluation",
        "",
        *_evaluation(config.get("evaluation")),
        "",
        "## How to load",
        "",
        "```python",
        "import torch",
        "from raptor import RaptorBackbone",
        "",
        'model = RaptorBackbone.from_pretrained("THIS_FOLDER_OR_HUB_ID")  # checks the files',
        f"images = torch.randn(2, {prep['input_size'][0]}, {prep['input_size'][1]}, "
        f"{prep['input_size'][2]})  # normalized images",
        "tokens = model.forward_features(images)  # (B, T, D) final-normed tokens",
        "pooled = model(images)  # (B, 2D): [cls ; mean(patch)]",
        "```",
        "",
        f"Preprocessing: resize ({prep.get('interpolation', '?')}, crop_pct "
        f"{prep.get('crop_pct', '?')}) to {prep['input_size'][1:]}, then normalize with mean "
        f"{prep.get('mean')} and std {prep.get('std')}. Tokens: {config['tokens']['layout']}.",
        "",
        "## Integrity",
        "",
        f"- sha256 of the weights (`model.safetensors`'s tensors: names, dtypes, shapes and "
        f"bytes in name order): `{config.get('weights_sha256', 'not recorded')}`",
        f"- self-test: {test.get('output', 'not recorded')} on {test.get('input', '?')}, at "
        f"(token, feature) {test.get('positions')}; `from_pretrained` checks the hash, the "
        "recorded architecture fields and these outputs.",
        "",
        "## Citation",
        "",
        *(f"- {p}" for p in PAPERS),
        "",
    ]
    return "\n".join(lines)
