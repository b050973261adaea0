"""The data-efficiency picture: an encoder against the same architecture from random init, across label budgets.

``mpp evaluate INIT budgets=1,10,100,all`` runs the single-budget evaluation (:func:`mpp.eval.evaluate.run_budget`)
once per budget, for the encoder (``mae``) and for its baseline (``scratch``: the encoder's registry variant from
random init, fed the same normalisation at the same resolution; or ``scratch_init``). Every run keeps its own results
in ``<output>/<mae|scratch>/<budget>``; this module gathers their top-1 into

- ``efficiency.json``: per encoder, per budget: labels per class, labelled train images, top-1 of each protocol;
- ``efficiency.md``: one row per budget, one column per protocol and encoder, and the gain (MAE - scratch, points);
- ``efficiency.png``: top-1 against labels per class on a log axis (``all`` at its real per-class count), one colour
  per protocol, solid = MAE, dashed = scratch. Drawn with PIL like the confusion matrices of :mod:`mpp.eval.report`.

Budgets share labelled images (:mod:`mpp.eval.labels`: a smaller budget is a prefix of a larger one with one seed), and
both encoders see the same ones, so the curves differ only by the encoder. kNN and cached-probe features are
extracted once per encoder (:class:`~mpp.eval.features.FeatureCache`). The cached probe is left out at 1 label per
class: it chooses its lr on a validation split held out of the labelled images, which needs two of them per class.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw

from mpp.config import BUDGET_ALL, ConfigError, EvaluateConfig, from_dict, to_dict
from mpp.config.stages import at_budget, per_class_of
from mpp.eval.baselines import cnn_budget, pixel_budget
from mpp.eval.features import FeatureCache
from mpp.eval.session import Session
from mpp.models.registry import MODEL_CONFIGS
from mpp.runtime import (
    atomic_save_image,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    read_config,
    write_config,
)
from mpp.viz.text import pil_font, text_size

RunBudget = Callable[[Session, EvaluateConfig, Path, FeatureCache, str | None], Path]

ROLE_NAMES = {"mae": "MAE", "scratch": "ViT scratch", "cnn": "CNN scratch", "pixels": "pixels"}
PROTOCOL_NAMES = {
    "knn": "kNN",
    "probe": "linear probe",
    "logistic": "logistic regression",
    "finetune": "fine-tune",
    "finetune_ema": "fine-tune (EMA)",
    "finetune_semi": "semi-supervised fine-tune",
    "finetune_semi_ema": "semi-supervised fine-tune (EMA)",
}


def protocol_name(name: str) -> str:
    """A protocol as a reader knows it: ``knn`` -> ``kNN``; ``probe_tokens`` -> ``linear probe (tokens)``."""
    if name in PROTOCOL_NAMES:
        return PROTOCOL_NAMES[name]
    base, _, readout = name.partition("_")
    return f"{PROTOCOL_NAMES[base]} ({readout})" if base in PROTOCOL_NAMES and readout else name


# matplotlib's tab10 colours, in its order: familiar to readers of plots.
COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
GRID, MINOR_GRID = (210, 210, 210), (236, 236, 236)
# split_off keeps one image of each class for training, so a validation split needs two labelled images per class.
CACHED_PROBE_MIN_PER_CLASS = 2


# ------------------------------------------------------------------------------------------------ the sweep
def budget_dir(budget: int | str) -> str:
    """Sub-directory of one budget's run: ``10_per_class`` or ``all``."""
    return BUDGET_ALL if budget == BUDGET_ALL else f"{budget}_per_class"


def single_budget(config: EvaluateConfig, budget: int | str, output_dir: Path) -> EvaluateConfig:
    """``config`` as the one-budget evaluation the sweep runs for ``budget``, writing into ``output_dir``."""
    one = replace(
        config, budgets=None, labels_per_class=per_class_of(budget), label_fraction=None, output_dir=str(output_dir)
    )
    return at_budget(one)  # the fine-tune recipe chosen for this budget (finetune_recipes), if there is one


# Settings a finished run is reused across: how it reports, where the sweep was given (a relative or an absolute
# path to the same run), and the sweep's plan (which budgets, seeds and baselines run; each run's budget, seed and
# fine-tune recipe are in its own settings and are compared).
NOT_MEASURED = ("progress", "output_dir", "budgets", "compare_random", "scratch_init", "baselines", "label_seeds",
                "seeded_budgets", "finetune_recipes")  # fmt: skip


def finished_run(where: Path, config: EvaluateConfig, ignore: tuple[str, ...] = NOT_MEASURED) -> bool:
    """Whether ``where`` holds a finished run (results.json) of exactly ``config``, so a re-run sweep can reuse it.

    A sweep at several budgets and label seeds takes hours on a CPU; run again with the same ``output_dir`` it goes on
    where it stopped, and a new budget, seed or baseline adds to the finished runs. The run's saved config.yaml must
    equal ``config`` in every top-level setting but ``ignore`` (the encoder's path, labels, every protocol's recipe
    are compared); a setting added to mpp after the run was saved counts at its default, which keeps the old
    behaviour. A run cut before its results.json, or one made with other settings, runs again. The encoder file itself
    is not compared: a sweep over an encoder retrained at the same path needs a new ``output_dir``.
    """
    if not (where / "results.json").is_file() or not (where / "config.yaml").is_file():
        return False
    try:
        saved = from_dict(type(config), read_config(where / "config.yaml"))
    except ConfigError:  # unreadable, or a setting mpp no longer has
        return False
    # Through YAML, as config.yaml holds them: tuples become lists and the like.
    # The CNN settings a run never read are left out (CnnSettings.in_use).
    saved, config = (replace(c, cnn=c.cnn.in_use(c.labels_per_class)) for c in (saved, config))
    saved_dict, wanted = (yaml.safe_load(yaml.safe_dump(to_dict(c), sort_keys=False)) for c in (saved, config))
    for key in ignore:
        saved_dict.pop(key, None)
        wanted.pop(key, None)
    return saved_dict == wanted


def check_budgets(session: Session) -> None:
    """Fail before the first run, not after several, when the largest budget is more than a class has.

    Raises:
        LabelBudgetError: one line naming the class.
    """
    config: EvaluateConfig = session.config  # type: ignore[assignment]
    largest = max((int(b) for b in config.budgets or [] if b != BUDGET_ALL), default=None)
    if largest is not None:
        session.splits(config=single_budget(config, largest, Path(".")))


def scratch_config(session: Session) -> EvaluateConfig:
    """The baseline's config: ``scratch_init``, else the encoder's registry variant from random init.

    A random-init baseline gets the encoder's normalisation, resolution and pooling, so the two see identical inputs
    and are read out the same way.

    Raises:
        ConfigError: the encoder does not record its registry variant and ``model`` is not set.
    """
    config: EvaluateConfig = session.config  # type: ignore[assignment]
    encoder, meta = session.encoder, session.meta
    if config.scratch_init not in (None, "random"):
        return replace(config, init=config.scratch_init)
    variant = meta.get("variant") or config.model
    if variant not in MODEL_CONFIGS:
        which = f" (its {variant!r} is not one)" if variant else ""
        raise ConfigError(
            f"init {config.init!r} records no registry variant{which}: set model=<registry name> for the "
            "random-init baseline of budgets, or compare_random=false"
        )
    img_size, patch = config.img_size or encoder.img_size[0], config.patch_size or encoder.patch_size
    data = replace(config.data, mean=session.mean, std=session.std)
    pool = config.global_pool or encoder.global_pool  # a registry variant's own pooling may differ from the run's
    stem = getattr(encoder, "stem", "linear")  # the baseline is the same network: a conv stem if the encoder has one
    return replace(
        config,
        init="random",
        model=variant,
        data=data,
        img_size=img_size,
        patch_size=patch,
        global_pool=pool,
        stem=stem,
    )


def contenders(session: Session, run_budget: RunBudget) -> list[tuple[str, Session, RunBudget]]:
    """``(role, session, runner)`` of the encoder and of every baseline, on the same labelled images.

    ``mae`` is the encoder; ``scratch`` the same ViT from random init (not without ``compare_random``, nor when the
    encoder is a random init already); ``cnn`` a small-image ResNet from scratch and ``pixels`` kNN and logistic
    regression on raw pixels (``baselines``), both on the encoder's session: its data, normalisation and size.
    """
    config: EvaluateConfig = session.config  # type: ignore[assignment]
    roles: list[tuple[str, Session, RunBudget]] = [("mae", session, run_budget)]
    if config.compare_random and config.init == "random" and config.scratch_init in (None, "random"):
        session.say("efficiency: init is random already, so there is no separate random-init baseline")
    elif config.compare_random:
        scratch = Session.open(scratch_config(session), "efficiency", run_dir=session.run_dir, create_run_dir=False)
        roles.append(("scratch", scratch, run_budget))
    runners = {"cnn": cnn_budget, "pixels": pixel_budget}
    return roles + [(name, session, runners[name]) for name in runners if name in config.baselines]


def probe_skip(config: EvaluateConfig, budget: int | str) -> str | None:
    """Why the probe cannot run at ``budget`` (``None``: it can)."""
    few = budget != BUDGET_ALL and int(budget) < CACHED_PROBE_MIN_PER_CLASS
    if config.probe.mode == "cached" and few and not config.data.val_size:
        return (
            f"the cached probe chooses its lr on a validation split held out of the labelled images, which needs "
            f"{CACHED_PROBE_MIN_PER_CLASS} per class; data.val_size (a validation split) or probe.mode=full runs at "
            "any budget"
        )
    return None


def budget_point(budget: int | str, results: dict[str, Any], run_dir: Path, root: Path) -> dict[str, Any]:
    """One budget's line of efficiency.json, from that run's results.json."""
    labels = results["labels"]
    return {
        "budget": budget,
        # "all" is plotted at its real labels per class (mean over classes when they are unbalanced).
        "labels_per_class": labels["train_used"] / len(results["classes"]) if budget == BUDGET_ALL else budget,
        "train_used": labels["train_used"],
        "top1": {name: entry["top1"] for name, entry in results["protocols"].items()},
        # validation top-1 where the protocol measured it (data.val_size): what choices between runs are made on
        "val_top1": {name: e["val_top1"] for name, e in results["protocols"].items() if e.get("val_top1") is not None},
        "skipped": results.get("skipped", {}),
        # what each trained protocol cost: a baseline that trained for less is a weaker one, so the table says so
        "training": {
            name: {"steps": e["steps"], "minutes": e["train_minutes"], "blr": e.get("blr")}
            for name, e in results["protocols"].items()
            if e.get("train_minutes") is not None and e.get("steps") is not None
        },
        "output_dir": str(run_dir.relative_to(root)) if run_dir.is_relative_to(root) else str(run_dir),
    }


def seeds_of(config: EvaluateConfig, budget: int | str) -> list[int | None]:
    """The label seeds a budget runs with (``None``: the config's own, one run).

    ``label_seeds`` apply at ``seeded_budgets`` labels per class or fewer, where one subset is too noisy to rank on.
    """
    if config.label_seeds and budget != BUDGET_ALL and int(budget) <= config.seeded_budgets:
        return list(config.label_seeds)
    return [None]


def merge_seeds(points: list[dict[str, Any]]) -> dict[str, Any]:
    """One budget's point from its runs over label seeds: mean top-1, and each seed's and the spread (std) beside it."""
    if len(points) == 1:
        return points[0]
    first = points[0]
    names = [n for n in first["top1"] if all(n in p["top1"] for p in points)]
    by_seed = {n: [p["top1"][n] for p in points] for n in names}
    merged = {**first, "top1": {n: sum(v) / len(v) for n, v in by_seed.items()}, "top1_by_seed": by_seed}
    merged["spread"] = {n: statistics.stdev(v) for n, v in by_seed.items()}
    merged["val_top1"] = {
        n: sum(p["val_top1"][n] for p in points) / len(points)
        for n in first["val_top1"]
        if all(n in p["val_top1"] for p in points)
    }
    merged["training"] = {
        n: {
            **cost,
            "minutes": sum(p["training"][n]["minutes"] for p in points) / len(points),
            "blr": [p["training"][n]["blr"] for p in points],  # each subset's own where it was chosen per subset
        }
        for n, cost in first.get("training", {}).items()
        if all(n in p.get("training", {}) for p in points)
    }
    merged["output_dir"] = str(Path(first["output_dir"]).parent)
    return merged


def summary_line(role: str, point: dict[str, Any], mae: dict[str, Any] | None) -> str:
    """One line per run: the budget, top-1 per protocol and, for the baseline, what pretraining gains over it."""
    budget = point["budget"]
    where = "all labels" if budget == BUDGET_ALL else f"{budget} per class"
    parts = []
    for name, top1 in point["top1"].items():
        part = f"{name} {top1:.2f}%"
        reference = (mae or {}).get("top1", {}).get(name)
        if reference is not None:
            part += f" (MAE {reference:.2f}%, gain {reference - top1:+.2f})"
        parts.append(part)
    parts += [f"{name} skipped" for name in point["skipped"]]
    return f"efficiency: {ROLE_NAMES[role]}, {where} ({point['train_used']} images): {', '.join(parts)}"


def sweep(session: Session, run_budget: RunBudget) -> Path:
    """Evaluate the encoder and its baseline at every budget; write efficiency.json/.md/.png; the output directory.

    Args:
        session: the encoder's session; its config has ``budgets``, its run directory takes the sweep.
        run_budget: the single-budget evaluation (:func:`mpp.eval.evaluate.run_budget`), passed in because it lives in
            the command module that calls this one.
    """
    config: EvaluateConfig = session.config  # type: ignore[assignment]
    if not config.budgets:
        raise ConfigError("the efficiency sweep needs budgets, e.g. budgets=1,10,100,all")
    check_budgets(session)
    roles = contenders(session, run_budget)  # fails early, like the budgets, when the baseline cannot be built
    out = check_output_dir(session.run_dir)
    session.lock()
    if session.main:
        write_config(out / "config.yaml", to_dict(config))
    if config.finetune_recipes and (config.run_finetune or "cnn" in config.baselines):
        chosen = ", ".join(f"{budget} per class: {name}" for budget, name in config.finetune_recipes.items())
        session.say(f"efficiency: fine-tune recipes by budget ({chosen}; others: the finetune section)")
    encoders: dict[str, dict[str, Any]] = {}
    last: dict[str, Any] = {}  # a run's results.json, for what every run shares (data, classes, test size)
    for role, contender, runner in roles:
        cache = FeatureCache()  # one per encoder: features are its own
        for budget in config.budgets:
            points = []
            for seed in seeds_of(config, budget):  # small budgets: once per label subset, reported as mean and spread
                where = check_output_dir(
                    out / role / budget_dir(budget) / (f"labels{seed}" if seed is not None else "")
                )
                run_config = single_budget(contender.config, budget, where)  # type: ignore[arg-type]
                if seed is not None:
                    run_config = replace(run_config, label_seed=seed)
                if finished_run(where, run_config, NOT_MEASURED + (() if role == "cnn" else ("cnn",))):
                    session.say(f"efficiency: {ROLE_NAMES[role]}: {where} finished with these settings; reused")
                    run_dir = where
                else:
                    # A finished run with other settings is measured again; its old results must not outlive the new
                    # config.yaml if this run is cut too (they would be read back as this run's).
                    if session.main:
                        (where / "results.json").unlink(missing_ok=True)
                    run_dir = runner(contender, run_config, where, cache, probe_skip(run_config, budget))
                if session.main:
                    last = results = json.loads((run_dir / "results.json").read_text())
                    points.append(budget_point(budget, results, run_dir, out))
            if not session.main:
                continue
            entry = encoders.setdefault(
                role,
                {
                    "init": results["init"],
                    "variant": results["variant"],
                    "encoder_desc": results["encoder_desc"],
                    "results": [],
                },
            )
            point = merge_seeds(points)
            mae = encoders["mae"]["results"][len(entry["results"])] if role != "mae" else None
            entry["results"].append(point)
            session.say(summary_line(role, point, mae))
    if session.main:
        report = efficiency_report(config, last, encoders)
        write_efficiency(out, report)
        session.say(f"efficiency: {out / 'efficiency.md'}, {out / 'efficiency.png'}")
    return out


# ------------------------------------------------------------------------------------------------ results
def dataset_name(data: dict[str, Any]) -> str:
    """The dataset as a reader knows it: the source, or the folder / Hugging Face name it reads."""
    path = data.get("path")
    return Path(path).name if data["source"] == "folder" and path else path or data["source"]


def efficiency_report(config: EvaluateConfig, results: dict[str, Any], encoders: dict[str, Any]) -> dict[str, Any]:
    """efficiency.json: what was compared on which data, then every encoder's points."""
    seen = {p for entry in encoders.values() for point in entry["results"] for p in [*point["top1"], *point["skipped"]]}
    order = list(PROTOCOL_NAMES)
    protocols = sorted(seen, key=lambda p: (order.index(p) if p in order else len(order), p))
    data = {**results["data"], "path": config.data.path}
    return {
        "dataset": dataset_name(data),
        "data": data,
        "variant": encoders["mae"]["variant"] or config.model or "ViT",
        "num_classes": len(results["classes"]),
        "test_size": results["labels"]["test_size"],
        "label_seed": results["labels"]["label_seed"],
        "budgets": list(config.budgets or []),
        "label_seeds": list(config.label_seeds or []),
        "seeded_budgets": config.seeded_budgets,
        "protocols": protocols,
        "encoders": encoders,
    }


def _cell(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if spread is None else f"{value:.2f} ± {spread:.2f}"


def _budget_cell(point: dict[str, Any]) -> str:
    return f"all ({point['labels_per_class']:.4g})" if point["budget"] == BUDGET_ALL else str(point["budget"])


def curves(report: dict[str, Any]) -> list[tuple[str, str]]:
    """``(role, protocol)`` of every curve with at least one measured or skipped point, encoder by encoder."""
    out = []
    for role, entry in report["encoders"].items():
        for name in report["protocols"]:
            if any(name in p["top1"] or name in p["skipped"] for p in entry["results"]):
                out.append((role, name))
    return out


def best_of(points: list[dict[str, Any]]) -> tuple[float, str] | None:
    """The protocol chosen among ``(role, point)`` pairs, and its test top-1: ``(test, "role protocol")``.

    The choice is made on validation top-1 when every candidate measured one (``data.val_size``): choosing the best
    column by its test score would let the test set pick the readout. Without a validation split it falls back to test
    and the label says so.
    """
    found = [
        (p["val_top1"].get(n), v, f"{ROLE_NAMES[role]} {protocol_name(n)}")
        for role, p in points
        for n, v in p["top1"].items()
    ]
    if not found:
        return None
    if all(val is not None for val, _, _ in found):
        _, test, label = max(found, key=lambda f: (f[0], f[1]))
        return test, label
    test, label = max((t, name) for _, t, name in found)
    return test, f"{label}, by test: no validation split"


def efficiency_markdown(report: dict[str, Any]) -> str:
    """A table: one row per budget; top-1 (%) of every encoder and baseline, and MAE's best against the best other."""
    encoders = report["encoders"]
    roles, shown = list(encoders), curves(report)
    others = [r for r in roles if r != "mae"]
    header = ["labels per class", "train images"]
    header += [f"{ROLE_NAMES[r]} {protocol_name(n)}" for r, n in shown]
    header += ["MAE best - best baseline (which)"] if others else []
    lines = [
        f"# Data efficiency: {report['variant']} on {report['dataset']}",
        "",
        *[f"- {ROLE_NAMES[r]}: `{encoders[r]['init']}`, {encoders[r]['encoder_desc']}" for r in roles],
        "",
        f"Top-1 accuracy (%) on {report['test_size']} test images, every column on the same labelled images (seed "
        f"{report['label_seed']}; a smaller budget's are among a larger one's)."
        + (" The last column is the best MAE protocol minus the best baseline, in points." if others else "")
        + (
            f" Budgets of up to {report['seeded_budgets']} labels per class: mean ± std over label seeds "
            f"{report['label_seeds']}."
            if report.get("label_seeds")
            else ""
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    notes: dict[str, str] = {}
    for i, mae in enumerate(encoders["mae"]["results"]):
        points = {r: encoders[r]["results"][i] for r in roles}
        row = [_budget_cell(mae), str(mae["train_used"])]
        for role, name in shown:
            row.append(_cell(points[role]["top1"].get(name), points[role].get("spread", {}).get(name)))
            if name in points[role]["skipped"]:
                where = f"{ROLE_NAMES[role]} {protocol_name(name)} at {_budget_cell(mae)} per class"
                notes[where] = points[role]["skipped"][name]
        if others:
            ours, theirs = best_of([("mae", mae)]), best_of([(r, points[r]) for r in others])
            gain = "n/a" if ours is None or theirs is None else f"{ours[0] - theirs[0]:+.2f} ({theirs[1]})"
            row.append(gain)
        lines.append("| " + " | ".join(row) + " |")
    if notes:
        lines += ["", *[f"n/a: {where}: {why}." for where, why in notes.items()]]
    lines += training_table(report)
    lines += ["", "![top-1 accuracy against labels per class](efficiency.png)", ""]
    return "\n".join(lines)


def training_table(report: dict[str, Any]) -> list[str]:
    """Markdown lines: optimiser steps, minutes (mean over label seeds) and base lr of every trained column."""
    encoders = report["encoders"]
    trained = [(r, n) for r, e in encoders.items() for n in report["protocols"]
               if any(n in p.get("training", {}) for p in e["results"])]  # fmt: skip
    if not trained:
        return []
    budgets = [_budget_cell(p) for p in encoders["mae"]["results"]]
    lines = ["", "What each trained column cost (optimiser steps, minutes of training, base lr):", "",
             "| column | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]  # fmt: skip
    for role, name in trained:
        cells = []
        for point in encoders[role]["results"]:
            cost = point.get("training", {}).get(name)
            blrs = cost.get("blr") if cost else None
            blrs = (blrs if len(set(blrs)) > 1 else blrs[:1]) if isinstance(blrs, list) else [blrs]  # per seed
            blr = ", blr " + " / ".join(f"{b:g}" for b in blrs) if None not in blrs else ""
            cells.append(f"{cost['steps']} steps, {cost['minutes']:.1f} min{blr}" if cost else "n/a")
        lines.append(f"| {ROLE_NAMES[role]} {protocol_name(name)} | " + " | ".join(cells) + " |")
    return lines


def write_efficiency(out: Path, report: dict[str, Any]) -> Path:
    """Write efficiency.json, efficiency.md and efficiency.png into ``out``; the path of efficiency.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "efficiency.json", report)
    atomic_write_text(out / "efficiency.md", efficiency_markdown(report))
    atomic_save_image(draw_efficiency(report), out / "efficiency.png")
    return out / "efficiency.json"


# ------------------------------------------------------------------------------------------------ the plot
def _axis_range(values: list[float], log: bool) -> tuple[float, float]:
    """Plotted range of ``values``: log10 of them with a margin, or a 0-100 % range on round numbers."""
    if log:
        low, high = math.log10(min(values)), math.log10(max(values))
        pad = 0.08 * (high - low) if high > low else 0.5
        return low - pad, high + pad
    if not values:
        return 0.0, 100.0
    low = max(0.0, math.floor((min(values) - 2) / 10) * 10)
    high = min(100.0, math.ceil((max(values) + 2) / 10) * 10)
    return (low, high) if high - low >= 10 else (max(0.0, high - 10), max(10.0, high))


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], fill: Any, width: int, dash: float) -> None:
    """A polyline drawn in dashes of length ``dash`` (gaps 0.7 of it), the pattern running on across vertices."""
    on, phase = True, dash
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        length, done = math.hypot(x1 - x0, y1 - y0), 0.0
        while done < length:
            step = min(phase, length - done)
            if on:
                t0, t1 = done / length, (done + step) / length
                draw.line(
                    [(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0), (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)],
                    fill=fill,
                    width=width,
                )
            done += step
            phase -= step
            if phase <= 0:
                on = not on
                phase = dash if on else 0.7 * dash


def _series_line(
    draw: ImageDraw.ImageDraw,
    points: list[tuple[float, float]],
    colour: Any,
    scratch: bool,
    s: int,
    markers: list[tuple[float, float]] | None = None,
) -> None:
    """One encoder's curve of one protocol: solid with filled markers (MAE), dashed with open ones (scratch).

    Markers go on ``points`` unless ``markers`` says where (the legend's sample has one, in its middle).
    """
    if scratch:
        _dashed(draw, points, colour, 3 * s, 9 * s)
    elif len(points) > 1:
        draw.line(points, fill=colour, width=3 * s, joint="curve")
    r = 5 * s
    for x, y in points if markers is None else markers:
        draw.ellipse([x - r, y - r, x + r, y + r], fill="white" if scratch else colour, outline=colour, width=2 * s)


def _x_ticks(report: dict[str, Any]) -> list[tuple[float, str]]:
    """``(labels per class, tick label)`` of every budget, ``all`` named as such."""
    points = report["encoders"]["mae"]["results"]
    return [(p["labels_per_class"], "all" if p["budget"] == BUDGET_ALL else str(p["budget"])) for p in points]


def draw_efficiency(report: dict[str, Any], width: int = 960, height: int = 560) -> Image.Image:
    """Top-1 (%) against labels per class (log axis): a colour per curve, MAE solid, the baselines dashed."""
    s = 2  # drawn at twice the size, then scaled down: PIL draws lines without anti-aliasing
    img = Image.new("RGB", (width * s, height * s), "white")
    draw = ImageDraw.Draw(img)
    title_font, font, small = pil_font(18 * s), pil_font(14 * s), pil_font(12 * s)
    ticks = _x_ticks(report)
    lines_drawn = [
        (p, role, [(pt["labels_per_class"], pt["top1"].get(p)) for pt in report["encoders"][role]["results"]])
        for role, p in curves(report)
    ]
    names = [f"{ROLE_NAMES[role]} {protocol_name(protocol)}" for protocol, role, _ in lines_drawn]
    # The legend is as wide as its longest name (sample line and gaps: 70 px), so no name is cut at the edge.
    legend = max([text_size(draw, name, small)[0] for name in names] + [160 * s]) + 70 * s
    left, right, top, bottom = 76 * s, width * s - legend, 52 * s, (height - 66) * s
    ys = [y for _, _, pts in lines_drawn for _, y in pts if y is not None]
    ys += [
        v
        for e in report["encoders"].values()
        for p in e["results"]
        for vs in p.get("top1_by_seed", {}).values()
        for v in vs
    ]
    lx0, lx1 = _axis_range([x for x, _ in ticks], log=True)
    y0, y1 = _axis_range(ys, log=False)

    def px(x: float) -> float:
        return left + (math.log10(x) - lx0) / (lx1 - lx0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    # Grid: faint decades (the log scale), then a line and a label at every budget and every 10 (or 5) %.
    for decade in range(math.floor(lx0), math.ceil(lx1) + 1):
        if lx0 <= decade <= lx1:
            draw.line([(px(10**decade), top), (px(10**decade), bottom)], fill=MINOR_GRID, width=s)
    step = 10 if y1 - y0 > 30 else 5
    for y in range(int(y0), int(y1) + 1, step):
        draw.line([(left, py(y)), (right, py(y))], fill=GRID, width=s)
        tw, th = text_size(draw, str(y), small)
        draw.text((left - tw - 8 * s, py(y) - th / 2 - 2 * s), str(y), fill="black", font=small)
    last_label_end = -math.inf
    for x, label in ticks:
        draw.line([(px(x), top), (px(x), bottom)], fill=GRID, width=s)
        tw, _ = text_size(draw, label, small)
        if px(x) - tw / 2 > last_label_end + 4 * s:  # budgets too close on the axis: keep the first label
            draw.text((px(x) - tw / 2, bottom + 8 * s), label, fill="black", font=small)
            last_label_end = px(x) + tw / 2
    draw.rectangle([left, top, right, bottom], outline="black", width=s)
    # One colour per curve: the MAE protocols solid, every baseline dashed.
    colours = {(role, p): COLOURS[i % len(COLOURS)] for i, (p, role, _) in enumerate(lines_drawn)}
    for protocol, role, pts in lines_drawn:
        xy = [(px(x), py(y)) for x, y in pts if y is not None]
        _series_line(draw, xy, colours[(role, protocol)], role != "mae", s)
        for point in report["encoders"][role]["results"]:  # the label seeds' range, where there were several
            seen = point.get("top1_by_seed", {}).get(protocol)
            if seen:
                x = px(point["labels_per_class"])
                draw.line([(x, py(min(seen))), (x, py(max(seen)))], fill=colours[(role, protocol)], width=2 * s)
    # Legend beside the plot, one entry per curve.
    lx, ly = right + 20 * s, top
    for (protocol, role, _), name in zip(lines_drawn, names, strict=True):
        sample, middle = [(lx, ly + 10 * s), (lx + 40 * s, ly + 10 * s)], [(lx + 20 * s, ly + 10 * s)]
        _series_line(draw, sample, colours[(role, protocol)], role != "mae", s, middle)
        draw.text((lx + 50 * s, ly + 2 * s), name, fill="black", font=small)
        ly += 26 * s
    title = f"Data efficiency: {report['variant']} on {report['dataset']}"
    draw.text((left, 14 * s), title, fill="black", font=title_font)
    xlabel = "labels per class (log scale)"
    tw, _ = text_size(draw, xlabel, font)
    draw.text(((left + right) / 2 - tw / 2, bottom + 32 * s), xlabel, fill="black", font=font)
    ylabel = "top-1 accuracy (%)"
    tw, th = text_size(draw, ylabel, font)
    side = Image.new("RGB", (tw + 8 * s, th + 10 * s), "white")
    ImageDraw.Draw(side).text((4 * s, 2 * s), ylabel, fill="black", font=font)
    turned = side.rotate(90, expand=True)
    img.paste(turned, (10 * s, round((top + bottom) / 2 - turned.height / 2)))
    return img.resize((width, height), Image.Resampling.LANCZOS)
