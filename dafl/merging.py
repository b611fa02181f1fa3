"""`python -m dafl zip`: merge teachers trained on different classes (ZipIt!) and compare
merging methods, with real unlabeled images or with images from a DAFL generator trained
against each teacher (data-free merging).

For every image source the table has: weight averaging, permutation (Hungarian), ZipIt
full, ZipIt partial at every depth, and the ensemble (= partial zip at depth 0), each
with joint accuracy (argmax over all classes) and per-task accuracy (argmax over that
task's classes, on that task's test images). The merges named under `outputs` are written
as teachers (safetensors + card) that `python -m dafl fit` can distil.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from dafl.contract import InputContract
from dafl.datasets import dataset_info, load_split
from dafl.errors import ConfigError, OneLineParser, read_yaml_mapping
from dafl.weights import known_classes, load_classifier, resolve, save_classifier
from dafl.zipit import MatchBlocked, build_zipped, feature_correlations, reset_batchnorm
from dafl.zipped import ZippedClassifier, max_depth

DEFAULTS = {"merge_images": 2048, "alpha": 0.3, "beta": 0.125, "same_index_tiebreak": False,
            "sources": ["real", "generator"], "seed": 0,
            "generator": {"iterations": 300, "batch_size": 256, "width": 32, "lr": 1e-3}, "outputs": []}


def load_teachers(paths: list[str]) -> tuple[list[torch.nn.Module], list[dict], list[list[int]]]:
    """The teachers, their metadata and class lists (original class indices, from the
    `classes` metadata that `fit` records when a teacher was trained on a class subset)."""
    if len(paths) < 2:
        raise ConfigError("zip needs at least two teachers")
    teachers, metas = zip(*(load_classifier(resolve(p)) for p in paths))
    first = metas[0]
    for path, meta in zip(paths, metas):
        for key in ("arch", "in_channels", "image_size", "dataset"):
            if meta.get(key) != first.get(key):
                raise ConfigError(f"{path} has {key}={meta.get(key)}, {paths[0]} has {first.get(key)}: "
                                  "teachers must share architecture, input shape and dataset")
    class_lists = known_classes(paths, list(metas))
    for teacher in teachers:
        teacher.eval().requires_grad_(False)
    return list(teachers), list(metas), class_lists


def real_images(meta: dict, count: int, seed: int) -> torch.Tensor:
    """`count` unlabeled training images of the teachers' dataset, every class (labels unused)."""
    train = load_split(meta["dataset"], "train")
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(seed))[:count]
    adapter = InputContract.from_metadata(meta).adapter()
    return adapter(train.images[order])


def generator_images(teachers: list[torch.nn.Module], metas: list[dict], count: int, settings: dict,
                     seed: int) -> torch.Tensor:
    """Images from a DAFL generator trained against each teacher (no data), equal shares."""
    from dafl.generator import fit_generator

    shares = []
    for k, (teacher, meta) in enumerate(zip(teachers, metas)):
        torch.manual_seed(seed + k)
        objective = fit_generator(teacher, meta, settings["iterations"], settings["batch_size"], settings["width"],
                                  settings["lr"], progress=f"generator for teacher {k + 1}/{len(teachers)}")
        n = count // len(teachers) + (1 if k < count % len(teachers) else 0)
        z, _ = objective.latents(n)
        shares.append(torch.cat([objective.sample(chunk) for chunk in z.split(settings["batch_size"])]))
    return torch.cat(shares)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             class_lists: list[list[int]]) -> dict[str, float]:
    """Joint accuracy over all classes, and each task's accuracy among its own classes."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x in images.split(1000)])
    result = {"joint": float((logits.argmax(1) == labels).float().mean())}
    for k, classes in enumerate(class_lists):
        mine = torch.isin(labels, torch.tensor(classes))
        local = logits[mine][:, classes].argmax(1)
        result[f"task{k + 1}"] = float((torch.tensor(classes)[local] == labels[mine]).float().mean())
    return result


def variants(depth_max: int) -> list[tuple[str, str, int]]:
    """(row name, method, depth) for the comparison table."""
    rows = [("weight averaging", "average", depth_max), ("permutation", "permutation", depth_max),
            ("ZipIt full", "zipit", depth_max)]
    rows += [(f"ZipIt partial, depth {d}", "zipit", d) for d in range(depth_max - 1, 0, -1)]
    return rows + [("ensemble", "zipit", 0)]


def merge(teachers, class_lists, meta, method: str, depth: int, correlations, images: torch.Tensor, cfg: dict
          ) -> ZippedClassifier:
    zipped = build_zipped(teachers, class_lists, meta["arch"], depth, method, correlations, cfg["alpha"], cfg["beta"],
                          meta["in_channels"], meta["image_size"], same_index_tiebreak=bool(cfg["same_index_tiebreak"]))
    batches = images.split(256)
    reset_batchnorm(zipped, batches)
    zipped.information = zipped.calibrate_heads(batches)["information_after"]  # the label-free signal of the table
    return zipped.eval()


def zip_main(argv: list[str]) -> None:
    parser = OneLineParser(prog="python -m dafl zip", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fashion_mnist/zipit.yaml", help="zip YAML")
    parser.add_argument("--out", default=None, help="output folder (default runs/zip_<config name>)")
    parser.add_argument("--sources", default=None, help="comma-separated subset of: real, generator")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing table and existing merged-teacher files")
    opts = parser.parse_args(argv)
    config_path = resolve(opts.config)
    if not config_path.is_file():
        raise ConfigError(f"zip config not found: {opts.config}")
    cfg = {**DEFAULTS, **read_yaml_mapping(config_path, "zip config")}
    if not isinstance(cfg["generator"], dict) or not isinstance(cfg["outputs"], list) \
            or not isinstance(cfg.get("teachers", []), list):
        raise ConfigError(f"{opts.config}: generator must be a mapping, outputs and teachers lists")
    cfg["generator"] = {**DEFAULTS["generator"], **cfg["generator"]}
    cfg["_config_name"] = opts.config
    if "teachers" not in cfg:
        raise ConfigError(f"{opts.config} lacks teachers")
    sources = opts.sources.split(",") if opts.sources else cfg["sources"]
    unknown = set(sources) - {"real", "generator"}
    if unknown or not sources:
        raise ConfigError(f"unknown image source(s) {sorted(unknown)}; use real, generator")
    for key, group in (("merge_images", cfg), ("seed", cfg), ("iterations", cfg["generator"]),
                       ("batch_size", cfg["generator"]), ("width", cfg["generator"])):
        value = group[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise ConfigError(f"{key} must be a whole number{'' if key == 'seed' else ' >= 1'}, got {value!r}")
    for key in ("alpha", "beta"):
        if not isinstance(cfg[key], (int, float)) or not 0 <= cfg[key] <= 1:
            raise ConfigError(f"{key} must be a number in [0, 1], got {cfg[key]!r}")
    for spec in cfg["outputs"]:
        if spec.get("method", "zipit") not in ("zipit", "permutation", "average", "ensemble") or \
                spec.get("source", "generator") not in ("real", "generator"):
            raise ConfigError(f"bad output {spec}: method zipit|permutation|average|ensemble, source real|generator")
    out = Path(opts.out or f"runs/zip_{config_path.stem}")
    existing = [str(p) for p in [out / "table.md", *(Path(spec["path"]) for spec in cfg["outputs"] if spec.get("path"))]
                if p.exists()]
    if existing and not opts.overwrite:
        raise ConfigError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace, or --out elsewhere")
    teachers, metas, class_lists = load_teachers(cfg["teachers"])
    meta = metas[0]
    depth_max = max_depth(teachers[0])
    for spec in cfg["outputs"]:  # checked before any merging: a bad depth fails in seconds
        depth = spec.get("depth", "full")
        if depth not in ("full", "ensemble", "auto") and not (isinstance(depth, int) and 0 <= depth <= depth_max):
            raise ConfigError(f"output depth {depth!r} is not full, ensemble, auto or a whole number in 0..{depth_max} "
                              f"({meta['arch']} has {depth_max} mergeable layers)")
    info = dataset_info(meta["dataset"])
    test = load_split(meta["dataset"], "test")
    adapter = InputContract.from_metadata(meta).adapter()
    test_images, test_labels = adapter(test.images), test.labels
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    rows, merged_models = [], {}
    for k, (teacher, classes) in enumerate(zip(teachers, class_lists)):
        rows.append({"source": "-", "method": f"teacher {k + 1} alone (classes {classes[0]}-{classes[-1]})",
                     **{f"task{j + 1}": None for j in range(len(teachers))}, "joint": None,
                     f"task{k + 1}": _own_task_accuracy(teacher, test_images, test_labels, classes)})
    for source in sources:
        start = time.time()
        images = (real_images(meta, cfg["merge_images"], cfg["seed"]) if source == "real"
                  else generator_images(teachers, metas, cfg["merge_images"], cfg["generator"], cfg["seed"]))
        correlations = feature_correlations(teachers, images.split(256))
        prepared = time.time() - start
        for name, method, depth in tqdm(variants(depth_max), desc=f"merging ({source} images)", leave=False):
            try:
                zipped = merge(teachers, class_lists, meta, method, depth, correlations, images, cfg)
            except MatchBlocked as blocked:  # one variant out of reach is a row, not the end of the table
                merged_models[(source, method, depth)] = blocked
                rows.append({"source": source, "method": f"{name} (blocked by alpha/beta)"})
                continue
            merged_models[(source, method, depth)] = zipped
            rows.append({"source": source, "method": name, "information": zipped.information,
                         **evaluate(zipped, test_images, test_labels, class_lists)})
        print(f"{source} images: {len(images)} images and correlations in {prepared:.0f}s")
    written, unwritten = [], []
    for spec in cfg["outputs"]:
        if spec.get("source", "generator") not in sources:
            print(f"Not written (its image source was not run): {spec}")
            continue
        try:
            written.append(_write_output(spec, merged_models, teachers, metas, class_lists, info, out, depth_max,
                                         cfg, test_images, test_labels))
        except MatchBlocked as blocked:
            unwritten.append(f"output {spec} not written: {blocked}")
    _write_table(rows, out, opts, cfg, meta, class_lists, written)
    if unwritten:  # after the table, so the comparison is kept
        raise ConfigError(unwritten[0])


def _own_task_accuracy(teacher, images, labels, classes) -> float:
    mine = torch.isin(labels, torch.tensor(classes))
    with torch.no_grad():
        local = torch.cat([teacher(x) for x in images[mine].split(1000)]).argmax(1)
    return float((torch.tensor(classes)[local] == labels[mine]).float().mean())


def _write_output(spec: dict, merged_models: dict, teachers, metas, class_lists, info, out: Path, depth_max: int,
                  cfg: dict, test_images, test_labels) -> str:
    method = spec.get("method", "zipit")
    depth = {"full": depth_max, "ensemble": 0}.get(str(spec.get("depth", "full")), spec.get("depth"))
    if method == "ensemble":
        method, depth = "zipit", 0
    if depth == "auto":  # the ZipIt depth whose merge keeps the most information on the merge images (no labels)
        source = spec.get("source", "generator")
        scored = {d: getattr(merged_models.get((source, "zipit", d)), "information", float("-inf"))
                  for d in range(depth_max + 1)}
        method, depth = "zipit", max(scored, key=scored.get)
    key = (spec.get("source", "generator"), method, int(depth))
    if key not in merged_models:
        raise ConfigError(f"output {spec} was not computed (sources: {cfg['sources']})")
    zipped = merged_models[key]
    if isinstance(zipped, MatchBlocked):
        raise zipped
    path = Path(spec.get("path") or out / f"merged_{key[0]}_{key[1]}_depth{key[2]}.safetensors")
    accuracy = evaluate(zipped, test_images, test_labels, class_lists)
    meta = metas[0]
    metadata = {"arch": "zipit", "base_arch": meta["arch"], "class_lists": class_lists, "depth": key[2],
                "num_classes": zipped.num_classes, "in_channels": meta["in_channels"],
                "image_size": meta["image_size"], "native_size": meta["native_size"], "mean": meta["mean"],
                "std": meta["std"], "dataset": info.name, "class_names": info.class_names,
                "kind": "classifier", "method": f"{key[1]} merge of {len(teachers)} teachers at depth {key[2]} "
                                                f"({key[0]} images)",
                "teachers": json.dumps([str(t) for t in cfg["teachers"]]), "test_acc": accuracy["joint"],
                "command": f"python -m dafl zip --config {cfg['_config_name']}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(path, zipped, metadata)
    card = [f"# Merged teacher: {metadata['method']}", "",
            f"- Teachers: {', '.join(cfg['teachers'])}; classes {class_lists}",
            f"- Merge images: {cfg['merge_images']} from {'a DAFL generator per teacher (no data)' if key[0] == 'generator' else 'the real training split (labels unused)'}",
            f"- alpha {cfg['alpha']}, beta {cfg['beta']}; BatchNorm statistics reset on the merge images; "
            "heads standardised (logit mean/std over the merge images), then one scale and shift per head fitted "
            "to maximise the mutual information between image and predicted class (no labels), rescaled "
            "together to the teachers' own logit spread, placed at their class indices",
            f"- Test accuracy (real test set): joint {100 * accuracy['joint']:.2f}%, "
            + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items() if k != "joint"),
            f"- Made by: `{metadata['command']}`",
            f"- Distil it: `python -m dafl fit --model.teacher {path}`"]
    path.with_suffix(".md").write_text("\n".join(card) + "\n")
    return str(path)


def _write_table(rows: list[dict], out: Path, opts, cfg: dict, meta: dict, class_lists, written: list[str]) -> None:
    import platform
    import os

    tasks = [f"task{k + 1}" for k in range(len(class_lists))]
    header = ["source", "method", "joint", *tasks, "information"]
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    nats = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row["source"], row["method"], *(fmt(row.get(k)) for k in header[2:-1]),
                             nats(row.get("information"))])
    lines = [f"# dafl zip: {len(class_lists)} {meta['arch']} teachers on {meta['dataset']}", "",
             f"Command: `python -m dafl zip --config {opts.config}`; machine: {os.cpu_count()} CPU cores, "
             f"{platform.machine()}. Tasks: " + "; ".join(f"task{k + 1} = classes {c}" for k, c in
                                                            enumerate(class_lists)) + ".",
             f"Merge images: {cfg['merge_images']} per source (real: unlabeled training images; generator: a DAFL "
             f"generator trained {cfg['generator']['iterations']} iterations against each teacher, no data). "
             f"alpha {cfg['alpha']}, beta {cfg['beta']}. Accuracy (%) on the real test set: joint = argmax over "
             "all classes; taskK = argmax over task K's classes on task K's images. information: the mutual "
             "information between merge image and predicted class after head calibration (nats, no labels; "
             "an output with `depth: auto` takes the ZipIt depth where it is highest).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row["source"], row["method"], *(fmt(row.get(k)) for k in header[2:-1]),
                                        nats(row.get("information"))]) + " |")
    if written:
        lines += ["", "Merged teachers written: " + ", ".join(f"`{w}`" for w in written)]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nWrote {out}/table.md, table.csv")
