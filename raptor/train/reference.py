"""Checkpoints of the Raptor reference code (KempnerInstitute/raptor), read without running them.

The reference's trainer saves whole modules with `torch.save(model)`: a stage-1 run saves a
`block.Block`, whose file name says its layers (`..._start_S_end_E_..._step_N.pt`: input
a_S, outputs a_{S+1}..a_E); a stage-2 run saves a `raptor.Raptor` holding the blocks
(`blocks`, an nn.ModuleList) and `thresholds` (the last layer of every block but the last:
our phase boundaries). Those module names are the reference scripts' own: they run from its
`raptor/` folder (`from block import Block`, `from raptor import Raptor`).

`read_pickled_module(path)` reads the archive's data.pkl with `ReferenceUnpickler`. Every
global the pickle names is looked up in `_ALLOWED`: the reference's classes and the torch.nn
classes its Block is built from become `Collected` objects (the pickled name and state);
tensors are rebuilt from the archive's bytes by this module's own functions; any other
global is refused with a UserError naming it, before anything calls it. Nothing is
imported and nothing from the file runs.

Weight map, reference Block -> `RecurrentBlock` (both take t = the 1-based index of the layer
produced, as a float):
    norm1, norm2                             -> norm1, norm2
    attn.in_proj_weight / in_proj_bias       -> attn.qkv (both [q; k; v], heads contiguous)
    attn.out_proj                            -> attn.proj
    ls1.gamma, ls2.gamma (nn.Identity: ones) -> ls1.gamma, ls2.gamma
    mlp[0], mlp[2] (mlp[1]: SwiGLU | GELU)   -> mlp.fc1, mlp.fc2 (SwiGLU gates with the first half)
    t_proj[0], t_proj[2] (when t_scale)      -> depth_in, depth_out
No transpose is needed: every weight is a Linear's (out, in) in both.

`import_reference(cfg, paths, out)` maps the blocks onto the config's Raptor and writes a
`raptor fit` checkpoint (`raptor.train.checkpoints`) into the run folder `out`.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor

from raptor.config import to_container
from raptor.errors import UserError
from raptor.model.partition import Partition
from raptor.model.raptor import Raptor
from raptor.model.teacher import Teacher
from raptor.run_folders import absolute_paths
from raptor.train.checkpoints import AtomicCheckpointIO
from raptor.train.runs import CKPT_DIR, LAST_CKPT, prepare_run_dir

BLOCK, RAPTOR = "block.Block", "raptor.Raptor"
_LAYER_SCALE, _SWIGLU = "block.LayerScale", "block.SwiGLU"
_NN = "torch.nn.modules."
_LINEAR = (f"{_NN}linear.Linear", f"{_NN}linear.NonDynamicallyQuantizableLinear")
_LAYER_NORM, _MHA = f"{_NN}normalization.LayerNorm", f"{_NN}activation.MultiheadAttention"
_GELU, _SILU = f"{_NN}activation.GELU", f"{_NN}activation.SiLU"
_IDENTITY, _SEQUENTIAL = f"{_NN}linear.Identity", f"{_NN}container.Sequential"
_MODULE_LIST = f"{_NN}container.ModuleList"

# the reference's file names: "..._start_S_end_E_..." (input layer S, last layer produced E)
_LAYERS_IN_NAME = re.compile(r"_start_(\d+)_end_(\d+)_")


class Collected:
    """A pickled object of an allowed class, kept as data: `pickled_as` (module.name),
    the constructor arguments and the state the pickle gives it. It has no behaviour."""

    pickled_as = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Collected:
        obj = super().__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _collector(name: str) -> type:
    return type(name.rsplit(".", 1)[1], (Collected,), {"pickled_as": name})


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, *_: Any) -> Tensor:
    """torch._utils._rebuild_tensor_v2's arguments -> a tensor (a copy, on the CPU)."""
    return storage.as_strided(tuple(size), tuple(stride), int(offset)).clone()


def _rebuild_parameter(data: Tensor, *_: Any) -> Tensor:
    """torch._utils._rebuild_parameter(_with_state): the parameter's data is all we keep."""
    return data


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# (module, name) in a pickle -> what it becomes; every other global is refused
_ALLOWED: Dict[tuple, Any] = {
    **{
        tuple(n.rsplit(".", 1)): _collector(n)
        for n in (BLOCK, RAPTOR, _LAYER_SCALE, _SWIGLU, *_LINEAR, _LAYER_NORM, _MHA)
        + (_GELU, _SILU, _IDENTITY, _SEQUENTIAL, _MODULE_LIST)
    },
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol 2 spells builtins so
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
}


class ReferenceUnpickler(pickle.Unpickler):
    """Unpickles the data.pkl of a torch.save archive with only `_ALLOWED` globals;
    storages are read from the archive's `data/` entries."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, where: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self.archive, self.prefix, self.where = archive, prefix, where
        self.storages: Dict[str, Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UserError(
                f"{self.where}: refused to unpickle the global {module}.{name}: a reference "
                "checkpoint holds only the reference's Block/Raptor modules and their tensors"
            )
        return found

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise UserError(f"{self.where}: unknown persistent id {pid!r} (not a torch.save file)")
        dtype, key = pid[1], str(pid[2])
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"{self.where}: storage {key} has no known type ({dtype!r})")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            self.storages[key] = (
                torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            )
        return self.storages[key]


def read_pickled_module(path: str | Path) -> Collected:
    """The object pickled in the torch.save file `path`, unpickled by `ReferenceUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference checkpoint not found: {path}")
    where = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(
            f"{where}: not a torch.save zip archive (files of torch < 1.6 are not read)"
        ) from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UserError(f"{where}: expected one <name>/data.pkl in the archive")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist():
            order = archive.read(prefix + "byteorder").decode().strip()
            if order != sys.byteorder:
                raise UserError(f"{where}: written {order}-endian, this machine is {sys.byteorder}")
        try:
            obj = ReferenceUnpickler(archive, prefix, where).load()
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"{where}: not a readable reference checkpoint ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
    if not isinstance(obj, Collected) or obj.pickled_as not in (BLOCK, RAPTOR):
        raise UserError(
            f"{where}: holds {getattr(obj, 'pickled_as', type(obj).__name__)}, expected the "
            f"reference's {BLOCK} (stage 1) or {RAPTOR} (stage 2)"
        )
    return obj


# ---------------------------------------------------------------------- weight map


def _child(obj: Collected, name: str, kinds: Sequence[str], where: str) -> Collected:
    child = (obj.state.get("_modules") or {}).get(name)
    if not isinstance(child, Collected) or child.pickled_as not in kinds:
        got = getattr(child, "pickled_as", type(child).__name__)
        raise UserError(f"{where}: {name} is {got}, expected {' or '.join(kinds)}")
    return child


def _tensor(obj: Collected, name: str, where: str) -> Tensor:
    t = (obj.state.get("_parameters") or {}).get(name)
    if not torch.is_tensor(t):
        raise UserError(f"{where}: {obj.pickled_as} has no tensor {name}")
    return t


def _params(obj: Collected, names: Sequence[str], into: str, where: str) -> Dict[str, Tensor]:
    return {f"{into}.{n}": _tensor(obj, n, f"{where} {into}") for n in names}


@dataclass
class ReferenceBlock:
    """One reference Block: `state` in `RecurrentBlock`'s names, and the options read from
    it that shapes do not show (mlp, depth_conditioning, ln_eps, num_heads)."""

    where: str
    state: Dict[str, Tensor]
    options: Dict[str, Any]


def block_weights(block: Collected, where: str) -> ReferenceBlock:
    """Map a reference Block onto `RecurrentBlock`'s state-dict names (module docstring)."""
    if block.pickled_as != BLOCK:
        raise UserError(f"{where}: is {block.pickled_as}, expected {BLOCK}")
    s = block.state
    state: Dict[str, Tensor] = {}
    norms = [_child(block, n, [_LAYER_NORM], where) for n in ("norm1", "norm2")]
    for name, norm in zip(("norm1", "norm2"), norms):
        state.update(_params(norm, ("weight", "bias"), name, where))
    attn = _child(block, "attn", [_MHA], where)
    a = attn.state
    if not (a.get("_qkv_same_embed_dim") and a.get("batch_first")) or a.get("add_zero_attn"):
        raise UserError(f"{where}: attn is not the reference's batch-first self-attention")
    if (a.get("_parameters") or {}).get("bias_k") is not None:
        raise UserError(f"{where}: attn has bias_k/bias_v, which the reference's Block does not")
    state["attn.qkv.weight"] = _tensor(attn, "in_proj_weight", f"{where} attn")
    state["attn.qkv.bias"] = _tensor(attn, "in_proj_bias", f"{where} attn")
    out_proj = _child(attn, "out_proj", _LINEAR, f"{where} attn")
    state.update(_params(out_proj, ("weight", "bias"), "attn.proj", where))
    for name in ("ls1", "ls2"):
        ls = _child(block, name, [_LAYER_SCALE, _IDENTITY], where)
        gamma = f"{name}.gamma"
        if ls.pickled_as == _IDENTITY:  # reference built with init_values=None
            state[gamma] = torch.ones_like(state["norm1.weight"])
        else:
            state[gamma] = _tensor(ls, "gamma", f"{where} {name}")
    mlp = _child(block, "mlp", [_SEQUENTIAL], where)
    act = _child(mlp, "1", [_SWIGLU, _GELU], f"{where} mlp")
    if act.pickled_as == _GELU and act.state.get("approximate", "none") != "none":
        raise UserError(f"{where}: mlp uses the tanh GELU; the Raptor's is the exact one")
    for i, name in (("0", "fc1"), ("2", "fc2")):
        lin = _child(mlp, i, _LINEAR, f"{where} mlp")
        state.update(_params(lin, ("weight", "bias"), f"mlp.{name}", where))
    depth = bool(s.get("t_scale"))
    if depth:
        t_proj = _child(block, "t_proj", [_SEQUENTIAL], where)
        _child(t_proj, "1", [_SILU], f"{where} t_proj")
        for i, name in (("0", "depth_in"), ("2", "depth_out")):
            lin = _child(t_proj, i, _LINEAR, f"{where} t_proj")
            state.update(_params(lin, ("weight", "bias"), name, where))
    eps = {float(n.state.get("eps", 0.0)) for n in norms}
    if len(eps) != 1:
        raise UserError(f"{where}: norm1 and norm2 have different eps {sorted(eps)}")
    options = {
        "mlp": "swiglu" if act.pickled_as == _SWIGLU else "gelu",
        "depth_conditioning": depth,
        "ln_eps": eps.pop(),
        "num_heads": int(a.get("num_heads", 0)),
    }
    return ReferenceBlock(where, state, options)


@dataclass
class Reference:
    """The blocks of reference checkpoints, in phase order, with what the files say of the
    partition (`boundaries`; `last_layer`: the last layer the blocks produce; None: unsaid)
    and the stage that wrote them."""

    blocks: List[ReferenceBlock]
    boundaries: Optional[List[int]]
    last_layer: Optional[int]
    stage: int
    paths: List[Path]


def read_reference(paths: Sequence[str | Path]) -> Reference:
    """One reference Raptor file (stage 2), or the stage-1 Block files of every phase."""
    paths = [Path(p) for p in paths]
    objs = [read_pickled_module(p) for p in paths]
    if any(o.pickled_as == RAPTOR for o in objs):
        if len(objs) != 1:
            raise UserError(
                "a reference Raptor file already holds every block: import it alone, "
                "or import the stage-1 block files of every phase together"
            )
        raptor, where = objs[0], str(paths[0])
        modules = _child(raptor, "blocks", [_MODULE_LIST], where).state.get("_modules") or {}
        keys = [str(j) for j in range(len(modules))]
        if sorted(modules) != sorted(keys):
            raise UserError(f"{where}: blocks are named {list(modules)}, expected {keys}")
        blocks = [block_weights(modules[key], f"{where} block {int(key) + 1}") for key in keys]
        thresholds = raptor.state.get("thresholds")
        if not isinstance(thresholds, (list, tuple)) or len(thresholds) != len(blocks) - 1:
            raise UserError(
                f"{where}: thresholds {thresholds!r} do not fit its {len(blocks)} blocks"
            )
        return Reference(blocks, [int(t) for t in thresholds], None, 2, paths)
    spans = [_LAYERS_IN_NAME.search(p.name) for p in paths]
    if not all(spans):
        return Reference(
            [block_weights(o, str(p)) for o, p in zip(objs, paths)], None, None, 1, paths
        )
    order = sorted(range(len(paths)), key=lambda i: int(spans[i].group(1)))
    layers = [(int(spans[i].group(1)), int(spans[i].group(2))) for i in order]
    starts = [0] + [end for _, end in layers[:-1]]
    if [start for start, _ in layers] != starts:
        raise UserError(
            "the block files' names give the layer spans "
            f"{[f'{s + 1}-{e}' for s, e in layers]}, which do not tile the depth from layer 1: "
            "give the stage-1 blocks of one partition"
        )
    blocks = [block_weights(objs[i], str(paths[i])) for i in order]
    return Reference(
        blocks, [end for _, end in layers[:-1]], layers[-1][1], 1, [paths[i] for i in order]
    )


def load_reference_blocks(raptor: Raptor, reference: Reference) -> None:
    """Copy the reference blocks' weights into `raptor`'s, refusing any option or shape
    that differs, with the config key to change."""
    want = {
        "mlp": ("model.mlp", raptor.block_options["mlp"]),
        "depth_conditioning": (
            "model.depth_conditioning",
            raptor.block_options["depth_conditioning"],
        ),
        "ln_eps": ("model.ln_eps", float(raptor.block_options["ln_eps"])),
        "num_heads": ("model.num_heads", raptor.num_heads),
    }
    for ref, block in zip(reference.blocks, raptor.blocks):
        for key, (cfg_key, value) in want.items():
            if ref.options[key] != value:
                raise UserError(
                    f"{ref.where}: the reference block has {key}={ref.options[key]}, the config "
                    f"{cfg_key}={value}; set {cfg_key}={ref.options[key]}"
                )
        own = block.state_dict()
        for name, t in ref.state.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise UserError(
                    f"{ref.where}: {name} has shape {tuple(t.shape)}, the config's Raptor "
                    f"{tuple(own[name].shape)} (the teacher's width, model.mlp_ratio and "
                    "model.depth_hidden must be the reference's)"
                )
        block.load_state_dict(ref.state, strict=True)


# ---------------------------------------------------------------------- the command's work


def import_reference(
    cfg: DictConfig, paths: Sequence[str | Path], out: str | Path
) -> Dict[str, Any]:
    """Map reference checkpoints onto the Raptor `cfg` describes (its teacher, model
    options; model.k and phases.boundaries must agree with the files, and are set from
    them) and write `out`/checkpoints/last.ckpt as `raptor fit` would, stage 2 for a
    reference Raptor, stage 1 (every block trained) for Block files; returns
    {"checkpoint", "stage", "boundaries", "raptor"}."""
    out = Path(out).absolute()
    ckpt_path = out / CKPT_DIR / LAST_CKPT
    if ckpt_path.exists():
        raise UserError(f"{ckpt_path} exists: choose another --out, or remove it first")
    reference = read_reference(paths)
    k = len(reference.blocks)
    if int(cfg.model.k) != k:
        raise UserError(
            f"the reference checkpoint(s) hold {k} block(s), the config model.k={cfg.model.k}: "
            f"use the config of k={k} or set model.k={k}"
        )
    configured = None if cfg.phases.boundaries is None else list(cfg.phases.boundaries)
    boundaries = reference.boundaries if reference.boundaries is not None else configured
    if boundaries is None:
        raise UserError(
            "the block files' names do not give their layers (..._start_S_end_E_...): set "
            "phases.boundaries=[...] and list the files in phase order"
        )
    if configured is not None and configured != boundaries:
        raise UserError(
            f"the reference blocks' phases end at {boundaries}, the config's "
            f"phases.boundaries={configured}: set phases.boundaries={boundaries}"
        )
    teacher_cfg = copy.deepcopy(cfg.teacher)
    teacher_cfg.head = ""  # only the teacher's shape is needed here
    teacher = Teacher.from_config(teacher_cfg)
    if reference.last_layer is not None and reference.last_layer != teacher.num_layers:
        raise UserError(
            f"the reference blocks produce layers up to {reference.last_layer}, the teacher "
            f"'{cfg.teacher.name}' has {teacher.num_layers}"
        )
    partition = Partition(teacher.num_layers, boundaries).with_k(k)
    raptor = Raptor.from_config(cfg.model, teacher, partition)
    load_reference_blocks(raptor, reference)

    cfg = absolute_paths(cfg)
    cfg.phases.boundaries = list(boundaries)
    cfg.train.stage = reference.stage
    cfg.run_dir = str(out)
    checkpoint = {
        "state_dict": {f"raptor.{key}": v for key, v in raptor.state_dict().items()},
        "hyper_parameters": {
            "config": to_container(cfg),
            "arch": raptor.arch_config(),
            "stage": reference.stage,
            "blocks": list(range(1, k + 1)),
        },
        "global_step": 0,
        "epoch": 0,
        "imported_from": [str(p.absolute()) for p in reference.paths],
    }
    prepare_run_dir(cfg, out)
    AtomicCheckpointIO().save_checkpoint(checkpoint, ckpt_path)
    return {
        "checkpoint": ckpt_path,
        "stage": reference.stage,
        "boundaries": list(boundaries),
        "raptor": raptor,
    }
