"""Blocks the user names: for a model discovery gets wrong, or cannot trace or run.

A spec says, per block, which module performs the residual addition, where its branch F(x)
ends and what its shortcut s(x) is. In text (`parse_spec`, the CLI's `--blocks-spec`), entries
are separated by ";" or new lines:

    MODULE[#K]=BRANCH[,SHORTCUT]

    layer1.0=bn2                       F(x) is bn2's output, s(x) the block's input
    layer2.0=bn2,downsample            s(x) is downsample's output
    encoder.layers.encoder_layer_0#1=right
                                       the module's addition #1 (0-based, counting the tensor +
                                       tensor additions its own forward makes): F(x) is its
                                       right operand, s(x) its left one
    blocks.0=fc,left                   same, F(x) (described as fc) is the right operand

Module names in BRANCH and SHORTCUT are relative to MODULE, or else absolute; "<model>" names
the model itself. A module-name branch gets forward hooks, and its SHORTCUT defaults to
"identity" (the block's input). A branch or shortcut given as `left`/`right` intercepts the
addition at run time (works on any model); the shortcut is then the other operand.

JSON (a text starting with "[" or a file holding one) is a list of objects with the keys
module, branch, and optionally shortcut, addition (K) and name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from torch import nn

from probe.discovery.block import Block, check_block
from probe.errors import ProbeError, unknown_name

ROOT = "<model>"
_OPERANDS = {"left": 0, "right": 1}
_IDENTITY = {"", "identity", "input"}


@dataclass(frozen=True)
class BlockSpec:
    """One user-named block (unresolved: names may be relative to `module`).

    module:   the module whose forward performs the addition ("<model>" or "" for the model).
    branch:   the module whose output is F(x), or "left"/"right": that operand of the addition.
    shortcut: the module whose output is s(x); None/"identity" for the block's input; or
              "left"/"right".
    addition: which tensor addition of the module's own forward (0-based); default 0.
    name:     the block's name; default the module's, with "[i]" when a module has several.
    """

    module: str
    branch: str
    shortcut: str | None = None
    addition: int | None = None
    name: str | None = None


def parse_spec(text: str) -> list[BlockSpec]:
    """The blocks a spec names: "MODULE[#K]=BRANCH[,SHORTCUT];...", JSON, or a file holding either."""
    if not isinstance(text, str) or not text.strip():
        raise ProbeError(f"empty block spec {text!r}; write e.g. 'layer1.0=bn2;layer2.0=bn2,downsample'.")
    source = "block spec"
    if "=" not in text and not text.lstrip().startswith(("[", "{")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ProbeError(f"block spec {text!r} is neither a spec ('MODULE=BRANCH[,SHORTCUT];...') "
                             "nor an existing file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ProbeError(f"block spec file {str(path)!r} is not text (byte {error.start} is not UTF-8); "
                             "write the spec as 'MODULE=BRANCH[,SHORTCUT];...' or as JSON.") from error
        source = f"block spec file {str(path)!r}"
    if text.lstrip().startswith(("[", "{")):
        return _parse_json(text, source)
    return [_parse_entry(entry.strip(), source) for entry in text.replace("\n", ";").split(";") if entry.strip()]


def _parse_entry(entry: str, source: str) -> BlockSpec:
    hint = "write MODULE[#K]=BRANCH[,SHORTCUT], e.g. 'layer2.0=bn2,downsample'"
    module, equals, rest = entry.partition("=")
    if not equals or not rest.strip():
        raise ProbeError(f"{source}: entry {entry!r} has no '=BRANCH'; {hint}.")
    module, hash_, index = module.strip().partition("#")
    addition = None
    if hash_:
        if not index.strip().isdigit():
            raise ProbeError(f"{source}: entry {entry!r}: the addition after '#' must be a number >= 0, "
                             f"not {index.strip()!r}; {hint}.")
        addition = int(index)
    parts = [p.strip() for p in rest.split(",")]
    if len(parts) > 2 or not parts[0]:
        raise ProbeError(f"{source}: entry {entry!r} should name one branch and at most one shortcut; {hint}.")
    shortcut = parts[1] if len(parts) == 2 else None
    return BlockSpec(module=module, branch=parts[0], shortcut=shortcut, addition=addition)


def _parse_json(text: str, source: str) -> list[BlockSpec]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProbeError(f"{source} is not valid JSON ({error}).") from error
    if not isinstance(items, list):
        raise ProbeError(f"{source}: expected a JSON list of blocks, got {type(items).__name__}.")
    return [_spec_from_dict(item, f"{source}, item {i}") for i, item in enumerate(items)]


def _spec_from_dict(item: object, where: str) -> BlockSpec:
    known = [f.name for f in fields(BlockSpec)]
    if not isinstance(item, dict):
        raise ProbeError(f"{where}: expected an object with keys {known}, got {item!r}.")
    unknown = sorted(set(item) - set(known))
    if unknown:
        raise ProbeError(f"{where}: unknown key(s) {unknown}; use {known}.")
    if "module" not in item or "branch" not in item:
        raise ProbeError(f"{where}: 'module' and 'branch' are required, got {item!r}.")
    for key in ("module", "branch", "shortcut", "name"):
        optional = key in ("shortcut", "name")
        if not isinstance(item.get(key), str) and not (optional and item.get(key) is None):
            raise ProbeError(f"{where}: {key!r} must be a string{' or null' if optional else ''}, not {item[key]!r}.")
    addition = item.get("addition")
    if addition is not None and (not isinstance(addition, int) or isinstance(addition, bool) or addition < 0):
        raise ProbeError(f"{where}: 'addition' must be an int >= 0, not {addition!r}.")
    return BlockSpec(**item)


def blocks_from_spec(model: nn.Module, spec: str | Sequence[BlockSpec | Block | dict]) -> list[Block]:
    """Blocks of `model` as `spec` names them (a spec text, or a list of BlockSpec, dict or Block)."""
    items = parse_spec(spec) if isinstance(spec, str) else list(spec)
    if not items:
        raise ProbeError("the block spec names no blocks.")
    modules = dict(model.named_modules())
    specs = [_spec_from_dict(item, f"block spec item {i}") if isinstance(item, dict) else item
             for i, item in enumerate(items)]
    per_module: dict[str, int] = {}
    for item in specs:
        if isinstance(item, BlockSpec):
            module = _module_name(item.module)
            per_module[module] = per_module.get(module, 0) + 1
    seen: dict[str, int] = {}
    blocks = []
    for position, item in enumerate(specs):
        if isinstance(item, Block):
            blocks.append(check_operands(check_block(item, modules)))
            continue
        if not isinstance(item, BlockSpec):
            raise ProbeError(f"block spec item {position} is a {type(item).__name__}; give BlockSpec, dict or Block.")
        module = _module_name(item.module)
        index = seen.get(module, 0)
        seen[module] = index + 1
        default_name = (module or ROOT) if per_module[module] == 1 else f"{module or ROOT}[{index}]"
        blocks.append(check_operands(_resolve(item, module, item.name or default_name, position, modules)))
    _refuse_repeats(blocks)
    names = [b.name for b in blocks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ProbeError(f"the block spec names {repeated} more than once; give each block a unique name.")
    return blocks


def _refuse_repeats(blocks: Sequence[Block]) -> None:
    """Two entries for one block (the same addition of a module, or the same branch module hooked
    twice) would be measured and deleted twice, as two identical rows."""
    first: dict[tuple, Block] = {}
    for block in blocks:
        key = ((block.module, "addition", block.add_index or 0) if block.strategy == "intercept"
               else (block.module, "branch", block.branch))
        if key in first:
            raise ProbeError(f"the block spec names block {block.module or ROOT!r} (branch {block.branch!r}) twice, "
                             f"as {first[key].name!r} and {block.name!r}; name each block once.")
        first[key] = block


def check_operands(block: Block) -> Block:
    """`block`, after checking that its branch and shortcut are two different modules."""
    if block.strategy == "hooks" and block.branch == block.shortcut:
        raise ProbeError(f"block {block.name!r} names {block.branch!r} both as its branch and as its shortcut: "
                         "F(x) would be measured against itself (ratio 1, cosine 1). Name the module whose "
                         "output is s(x), or leave the shortcut out for the block's input.")
    return block


def _module_name(name: str) -> str:
    name = name.strip()
    return "" if name == ROOT else name


def _resolve(item: BlockSpec, module: str, name: str, position: int, modules: dict[str, nn.Module]) -> Block:
    """The Block `item` describes, with its names checked against the model."""
    if module not in modules:
        raise unknown_name("block module", module, [n for n in modules if n])
    branch, shortcut = item.branch.strip(), (item.shortcut or "").strip()
    where = f"block {name!r}"
    if branch in _OPERANDS or shortcut in _OPERANDS:
        # Intercepted at the addition: the operand words fix which side is F(x).
        if branch in _OPERANDS:
            operand = _OPERANDS[branch]
            if shortcut and shortcut not in _IDENTITY and _OPERANDS.get(shortcut) != 1 - operand:
                raise ProbeError(f"{where}: with branch {branch!r} the shortcut is the other operand of the "
                                 f"addition; leave it out instead of {shortcut!r}.")
            branch_text = branch
        else:
            operand = 1 - _OPERANDS[shortcut]
            branch_text = _module(branch, module, modules, f"{where}: branch")
        # Left out, the shortcut is "the other operand"; only an explicit "identity" claims more.
        shortcut_text = None if shortcut in _IDENTITY - {""} else ("left", "right")[1 - operand]
        return Block(name=name, module=module, branch=branch_text, shortcut=shortcut_text, position=position,
                     strategy="intercept", add_index=item.addition or 0, branch_operand=operand)
    return Block(name=name, module=module, branch=_module(branch, module, modules, f"{where}: branch"),
                 shortcut=None if shortcut in _IDENTITY else _module(shortcut, module, modules, f"{where}: shortcut"),
                 position=position, strategy="hooks", add_index=item.addition)


def _module(name: str, block_module: str, modules: dict[str, nn.Module], role: str) -> str:
    """`name` as a qualified module name: relative to the block module first, then absolute."""
    relative = f"{block_module}.{name}" if block_module else name
    for candidate in (relative, name):
        if candidate in modules and candidate != block_module:
            return candidate
    inside = [n[len(block_module) + 1:] for n in modules if block_module and n.startswith(block_module + ".")]
    raise unknown_name(f"module for {role}", name, inside or [n for n in modules if n])
