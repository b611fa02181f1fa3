"""`python -m dafl fit --help`: the model's and the data's options first, one line each,
read from the classes the config names (their `__init__` signature and the "Args:"
section of its docstring). LightningCLI's full list (Trainer options too) stays behind
`--help-all`."""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

COMMON = [
    ("--config FILE", "YAML config (several may be given, later ones override); default configs/default.yaml"),
    ("--run_dir DIR", "run folder for checkpoints, logs, samples and the export; default runs/<config name>"),
    ("--overwrite", "replace a run already in the run folder"),
    ("--ckpt_path last|FILE", "resume the run from its last checkpoint (or a checkpoint file of this run)"),
    ("--checkpoint_minutes M", "also save checkpoints/last.ckpt every M minutes of training (default 2)"),
    ("--seed_everything N", "random seed (default 0)"),
    ("--trainer.max_epochs N", "epochs to train"),
    ("--trainer.accelerator A", "cpu, gpu or auto (default auto)"),
    ("--print_config", "print the resolved config and exit"),
]


def argument_docs(function) -> dict[str, str]:
    """{argument: first sentence} from a Google-style "Args:" section; an entry may name
    several arguments ("a, b: text")."""
    doc = inspect.getdoc(function) or ""
    match = re.search(r"^Args:\s*$(.*?)(?=^\S|\Z)", doc, flags=re.M | re.S)
    if not match:
        return {}
    entries: list[tuple[list[str], str]] = []
    indent = None
    for line in match.group(1).splitlines():
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        head = re.match(r"\s*([\w, ]+):\s*(.*)$", line)
        if head and (indent is None or width <= indent):
            indent = width
            entries.append(([n.strip() for n in head.group(1).split(",")], head.group(2).strip()))
        elif entries:
            names, text = entries[-1]
            entries[-1] = (names, f"{text} {line.strip()}")
    docs = {}
    for names, text in entries:
        sentence = re.split(r"(?<=[.)])\s+(?=[A-Z(])", text, maxsplit=1)[0]
        for name in names:
            docs[name] = sentence
    return docs


def _default(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if isinstance(value, dict) and "class_path" in value:
        return value["class_path"].rpartition(".")[2]
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def class_options(class_path: str, prefix: str, config_values: dict) -> list[str]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    docs = argument_docs(cls.__init__)
    lines = [f"{prefix} options ({class_path}):"]
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = config_values.get(parameter.name, parameter.default)
        default = f"[{'config' if parameter.name in config_values else 'default'}: {_default(value)}]"
        lines.append(f"  --{prefix}.{parameter.name:<30s} {docs.get(parameter.name, '')} {default}".rstrip())
    return lines


def _merge(base: dict, overlay: dict) -> dict:
    """`overlay` over `base`, nested mappings merged; a new class_path drops the old init_args."""
    if "class_path" in overlay and overlay["class_path"] != base.get("class_path"):
        base = {}
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def fit_help(config_files: list[str]) -> str:
    """The help text for `fit` with these config files (later ones override earlier ones)."""
    from dafl.errors import read_yaml_mapping

    config: dict = {}
    for path in config_files:
        config = _merge(config, read_yaml_mapping(path, "config"))
    lines = ["usage: python -m dafl fit [--config FILE ...] [--model.OPTION VALUE ...] [--data.OPTION VALUE ...]",
             "", "Train by config: data-free distillation by default (configs/default.yaml).", "",
             "Run options:"]
    lines += [f"  {flag:<32s} {text}" for flag, text in COMMON]
    sections = [("model", config.get("model")), ("data", config.get("data"))]
    source = ((config.get("model") or {}).get("init_args") or {}).get("source")
    if isinstance(source, dict):
        sections.insert(1, ("model.source", source))
    for prefix, section in sections:
        if isinstance(section, dict) and "class_path" in section:
            lines += ["", *class_options(section["class_path"], prefix, section.get("init_args") or {})]
    lines += ["", "Every Trainer option (precision, devices, callbacks, ...): python -m dafl fit --help-all"]
    return "\n".join(lines)
