"""Typed configs of the evaluation stages (kNN, linear probe, fine-tuning, evaluate), built like pretraining's.

Defaults follow the MAE paper's protocols (linear probe: LARS, blr 0.1, 90 epochs, warmup 10, cls token; fine-tuning:
the ViT-B recipe); recipes state what differs (data, batch split across GPUs, CPU-sized runs). Loading order is
defaults -> recipe -> ``key=value`` overrides, and every impossible value is a one-line :class:`ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mpp.config.core import (
    ConfigError,
    ScheduleConfig,
    SourceConfig,
    check,
    check_positive,
    check_precision,
    check_schedule,
    check_source,
    from_dict,
    load_yaml,
    to_dict,
)

PROBE_MODES = ("full", "cached")


@dataclass
class EvalDataConfig(SourceConfig):
    """Labelled images for evaluation: the source, its train and test splits, evaluation-time settings."""

    train_split: str = "train"
    test_split: str = "test"
    crop_pct: float | None = None  # evaluation center crop; the paper's ImageNet runs use 0.875 (256 -> 224)
    batch_size: int = 256  # feature extraction and evaluation batch
    test_limit: int | None = None  # a seeded subset of the test split, for quick checks only


@dataclass
class StageConfig:
    """What every evaluation stage shares: the encoder, the label budget, the data, the run."""

    init: str | None = None  # run dir, encoder.safetensors, checkpoint, hf://owner/name[@rev], or "random"
    hub_pickles: bool = False  # hf:// init: also fetch pickled weights (.pth/.bin); default safetensors only
    model: str | None = None  # registry variant for init=random
    stem: str | None = None  # init=random: the patch stem (linear or conv); None: the variant's (linear)
    global_pool: str | None = None  # token | avg | tokens (every patch token, flattened); None: the encoder's own
    feature_blocks: int = 1  # kNN / probe: concatenate the pooled outputs of the last n blocks (fine-tuning: 1)
    img_size: int | None = None  # evaluate / fine-tune at another resolution (position table resized)
    patch_size: int | None = None  # ... or another patch size (patch-embed kernel resampled)
    labels_per_class: int | None = None
    label_fraction: float | None = None
    label_seed: int | None = None  # None: seed
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    output_dir: str | None = None  # None: RUN/<stage>[_<budget>] beside a run's encoder, else runs/<stage>/<name>
    seed: int = 0
    cpu: bool = False
    mixed_precision: str = "auto"
    progress: bool = True
    # probe and finetune (the stages that train): experiment trackers, any of accelerate's; none: metrics.jsonl only
    trackers: list[str] | str = field(default_factory=lambda: ["tensorboard"])

    def check(self) -> None:
        """Raise :class:`ConfigError` on the first impossible value."""
        check_stage(self)


@dataclass
class KnnSettings:
    """Weighted cosine kNN (DINO): votes ``exp(sim / temperature)`` of the ``k`` nearest training images."""

    k: int = 20
    temperature: float = 0.07
    query_chunk: int = 512  # queries per similarity block: chunk x bank floats in memory


@dataclass
class KnnConfig(StageConfig):
    """``mpp knn``."""

    knn: KnnSettings = field(default_factory=KnnSettings)


@dataclass
class ProbeSettings(ScheduleConfig):
    """Linear probe: BatchNorm (no affine) + linear head on frozen features, LARS, warmup + cosine."""

    epochs: int = 90
    warmup_epochs: float = 10.0
    batch_size: int = 256
    blr: float = 0.1
    weight_decay: float = 0.0
    mode: str = "full"  # full: augmented images through the frozen encoder; cached: features once, lr sweep
    log_every: int = 10
    # Cached mode: one head per blr. LARS steps are a fraction (lr x 0.001) of the weight norm, so runs with far fewer
    # or smaller steps than the paper's (batch 16384, 90 epochs) need a larger blr; the sweep spans that range.
    blr_sweep: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    # Cached mode: weight decays (L2 on the head) swept with every blr, chosen on validation too; None: weight_decay.
    wd_sweep: list[float] | None = None
    val_fraction: float = 0.1  # cached mode: held out of the train split to choose the lr
    momentum: float = 0.9
    crop_scale_min: float = 0.08
    hflip: bool = True


@dataclass
class ProbeConfig(StageConfig):
    """``mpp probe``."""

    probe: ProbeSettings = field(default_factory=ProbeSettings)


@dataclass
class SemiSettings:
    """Semi-supervised fine-tuning (:mod:`mpp.eval.semi`): also learn from the training images left unlabeled.

    ``selftrain``: fine-tune on the labels, pseudo-label the unlabeled pool with that model (distribution-aligned,
    confidence-thresholded, class-balanced), fine-tune a fresh copy of the encoder on both, ``rounds`` times.
    ``fixmatch``: every labelled image brings ``mu`` unlabeled ones; the model's (or its EMA's) aligned prediction on a
    weak view labels a strong view when confident (FixMatch), weighted ``weight``.
    """

    enabled: bool = False
    method: str = "selftrain"  # selftrain | fixmatch
    rounds: int = 1  # selftrain: pseudo-labelling rounds after the labels-only fine-tune (a second one lost on
    # validation in docs/evaluation.md's measurements)
    threshold: float | None = None  # confidence (after alignment) a pseudo-label needs; None: fixmatch 0.9 (the
    # paper: 0.95), selftrain 0 (its equal top-k per class does the filtering)
    mu: int = 7  # fixmatch: unlabeled images per labelled one
    weight: float = 1.0  # fixmatch: weight of the unlabeled term
    ema_teacher: bool = False  # fixmatch: the weak view is labelled by the EMA model (needs finetune.ema)
    per_class: int | None = None  # at most this many per class; None: pool / classes x round / rounds
    align: bool = True  # distribution alignment: rescale the teacher's mean prediction to uniform (ReMixMatch)
    pool_limit: int | None = None  # a seeded subset of the unlabeled pool (fewer predictions per round)
    labelled_share: float = 0.5  # selftrain: true labels repeated to at least this share of a round's items (0: once)


@dataclass
class FinetuneSettings(ScheduleConfig):
    """Full fine-tuning, the paper's ViT-B recipe by default (AdamW, layer decay, drop path, RandAug, mixup)."""

    epochs: int = 100
    warmup_epochs: float = 5.0
    blr: float = 5e-4
    min_lr: float = 1e-6
    layer_decay: float = 0.65
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    fused: bool | None = None  # fused AdamW kernel; None: on with CUDA
    clip_grad: float | None = None
    drop_path_rate: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    crop_scale_min: float = 0.08
    hflip: bool = True
    ema: bool = False
    ema_decay: float = 0.9999
    log_every: int = 10
    save_model: bool = True
    semi: SemiSettings = field(default_factory=SemiSettings)
    # The classifier head's readout (token | avg | tokens); None: the stage's global_pool, else avg (the paper's). Its
    # own key so `mpp evaluate --finetune` can fine-tune on the token map while kNN and the probe read avg pooling.
    global_pool: str | None = None
    # random: the paper's head (truncated normal, std 2e-5); probe: LP-FT, the head first fitted as a logistic
    # regression on the frozen features (mpp.eval.lpft), L2 chosen on the validation images.
    head_init: str = "random"


def finetune_pool(config: StageConfig) -> str:
    """The readout a fine-tune head is built on: ``finetune.global_pool``, else ``global_pool``, else ``avg``."""
    settings = getattr(config, "finetune", None)
    return getattr(settings, "global_pool", None) or config.global_pool or "avg"


@dataclass
class FinetuneConfig(StageConfig):
    """``mpp finetune``."""

    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)


@dataclass
class CnnSettings:
    """The CNN-from-scratch baseline of the efficiency sweep (:class:`mpp.models.cnn.SmallImageResNet`).

    resnet18 is widths 64-512 with 2 blocks per stage; the default is a quarter of its width and half its depth, which
    trains about 4x faster on a CPU. It trains with the ``finetune`` section's recipe, at each base lr of
    ``blr_sweep`` when it is set.
    """

    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    # One CNN per base lr, the one best on validation kept (needs data.val_size): the ViT recipe's lr was chosen for
    # the ViT, and a baseline trained at someone else's lr is a weak one. Empty: the fine-tune recipe's blr alone.
    blr_sweep: list[float] = field(default_factory=list)
    # The sweep only at budgets of at most this many labels per class (None: every budget); larger ones train once at
    # ``blr``: all 55,000 Fashion-MNIST labels are an hour per lr on 2 CPU cores.
    blr_sweep_max_per_class: int | None = None
    # The base lr of a CNN that is not swept (None: the fine-tune recipe's, which was chosen for the ViT), e.g. the lr
    # the sweep chose at the largest swept budget.
    blr: float | None = None

    def swept_at(self, per_class: int | None) -> bool:
        """Whether a budget of ``per_class`` labels per class (``None``: all) trains one CNN per ``blr_sweep`` lr."""
        cap = self.blr_sweep_max_per_class
        return bool(self.blr_sweep) and (cap is None or (per_class is not None and per_class <= cap))

    def in_use(self, per_class: int | None) -> CnnSettings:
        """These settings less the ones a ``per_class`` budget never reads (at their defaults).

        A swept budget never reads ``blr``, an unswept one neither the grid nor its cap: a finished CNN run stays
        reusable when only a setting it never read has changed (e.g. ``cnn.blr`` chosen for the all-label budget).
        """
        if self.swept_at(per_class):
            return replace(self, blr=None)
        return replace(self, blr_sweep=[], blr_sweep_max_per_class=None)


BASELINES = ("pixels", "cnn")


@dataclass
class EvaluateConfig(StageConfig):
    """``mpp evaluate``: kNN and linear probe (and fine-tuning with ``run_finetune``) on one encoder."""

    knn: KnnSettings = field(default_factory=KnnSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    run_finetune: bool = False
    # More frozen readouts (global_pool values, e.g. tokens) measured beside global_pool by kNN and the cached probe,
    # as protocols knn_<pool> / probe_<pool>; the efficiency table's best column then chooses among them on validation.
    readouts: list[str] | str | None = None
    # Data-efficiency sweep (mpp.eval.efficiency): labels per class, or "all"; None runs the single budget above.
    budgets: list[int | str] | int | str | None = None
    compare_random: bool = True  # with budgets: also run the baseline, to show what pretraining buys
    scratch_init: str | None = None  # the baseline; None: the encoder's registry variant from random init
    # With budgets, on the same labelled images: raw pixels (kNN + logistic regression) and a CNN from scratch.
    baselines: list[str] | str = field(default_factory=lambda: ["pixels", "cnn"])
    # With budgets: run the budgets of seeded_budgets labels per class or fewer once per label seed (mean and spread).
    label_seeds: list[int] | None = None
    seeded_budgets: int = 10
    cnn: CnnSettings = field(default_factory=CnnSettings)
    # A fine-tune recipe per label budget ({10: finetune_fmnist_few, 100: finetune_fmnist_100, all: ...}): at that
    # budget its finetune section (and its global_pool, as the head's readout) replaces `finetune`, for the ViTs and
    # the CNN alike, so each budget fine-tunes with the recipe chosen for it on validation. Only finetune.semi carries
    # over when the recipe has none (so --finetune finetune.semi.enabled=true applies at every budget).
    finetune_recipes: dict[str, str] | None = None

    def __post_init__(self) -> None:
        # The command line gives "1,10,all" as one string, a recipe a list: keep one canonical form either way.
        self.budgets = parse_budgets(self.budgets)
        if isinstance(self.readouts, str):
            self.readouts = [r.strip() for r in self.readouts.split(",") if r.strip()]
        if isinstance(self.baselines, str):
            self.baselines = [b.strip() for b in self.baselines.split(",") if b.strip() and b.strip() != "none"]


BUDGET_ALL = "all"


def budget_finetune(config: EvaluateConfig) -> FinetuneSettings:
    """The fine-tune settings of ``config``'s label budget: its ``finetune_recipes`` entry, else ``finetune``.

    The budget is ``labels_per_class``, or ``all`` when neither it nor ``label_fraction`` is set; a fraction, or a
    budget without an entry, keeps ``finetune`` as it is.

    Raises:
        ConfigError: the recipe is missing or sets a fine-tune key that does not exist (one line naming both).
    """
    recipes = config.finetune_recipes or {}
    budget = BUDGET_ALL if config.labels_per_class is None else str(config.labels_per_class)
    name = None if config.label_fraction is not None else recipes.get(budget)
    if name is None:
        return config.finetune
    try:
        recipe = load_yaml(name)
        if not recipe.get("finetune"):
            raise ConfigError("not a fine-tune recipe: it has no finetune section")
        section = dict(recipe["finetune"])
        if recipe.get("global_pool") is not None:  # a fine-tune recipe's global_pool is its head's readout
            section.setdefault("global_pool", recipe["global_pool"])
        section.setdefault("semi", to_dict(config.finetune.semi))  # finetune.semi.* given to the sweep carry over
        settings = from_dict(FinetuneSettings, section, "finetune.")
        _check_finetune(settings)
    except ConfigError as err:
        raise ConfigError(f"finetune_recipes.{budget}={name}: {err}") from None
    return settings


def at_budget(config: EvaluateConfig) -> EvaluateConfig:
    """``config`` with the fine-tune settings of its own label budget (:func:`budget_finetune`)."""
    return replace(config, finetune=budget_finetune(config))


def parse_budgets(value: Any) -> list[int | str] | None:
    """The ``budgets`` setting as ascending labels-per-class counts, then ``"all"``, without repeats.

    Args:
        value: ``None``, a list (``[1, 10, all]`` in YAML), a comma-separated string (``"1,10,100,all"``, as the
            command line gives it) or one value (``10``, ``"all"``).

    Returns:
        ``None`` when ``value`` is ``None``, else e.g. ``[1, 10, 100, "all"]``.

    Raises:
        ConfigError: an item is neither a positive integer nor ``all``, or there is no item at all.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else [value]
    counts: set[int] = set()
    whole = False
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if isinstance(text, str) and text.lower() == BUDGET_ALL:
            whole = True
        elif isinstance(text, str) and text.isdigit() and int(text) > 0:
            counts.add(int(text))
        elif isinstance(text, int) and not isinstance(text, bool) and text > 0:
            counts.add(text)
        else:
            raise ConfigError(
                f"budgets={value!r}: {item!r} is not a label budget; give positive labels-per-class "
                "counts and/or all, e.g. budgets=1,10,100,all"
            )
    if not counts and not whole:
        raise ConfigError(f"budgets={value!r}: no budget given; e.g. budgets=1,10,100,all")
    return [*sorted(counts), *([BUDGET_ALL] if whole else [])]


# ------------------------------------------------------------------------------------------------ checks
def _check_schedule(section: Any, prefix: str) -> None:
    check_schedule(section, prefix)
    check(0.0 < section.crop_scale_min <= 1.0, f"{prefix}crop_scale_min", section.crop_scale_min, "must be in (0, 1]")


def check_stage(config: StageConfig) -> None:
    """Every impossible value of an evaluation config (one-line :class:`ConfigError` naming the key)."""
    from mpp.models.classifier import CLASSIFIER_POOLS
    from mpp.models.registry import MODEL_CONFIGS
    from mpp.train.trackers import check_trackers, parse_trackers

    check_trackers(parse_trackers(config.trackers))

    check(
        bool(config.init),
        "init",
        config.init,
        "is required: a pretraining run dir, an encoder.safetensors, a checkpoint file, or random",
    )
    if config.model is not None:
        check(
            config.model in MODEL_CONFIGS, "model", config.model, f"unknown; valid: {', '.join(sorted(MODEL_CONFIGS))}"
        )
    check(
        config.init != "random" or config.model is not None,
        "model",
        config.model,
        "init=random needs the architecture: set model=<registry name>, e.g. model=mae_vit_tiny_patch4",
    )
    check(
        config.global_pool in (None, *CLASSIFIER_POOLS),
        "global_pool",
        config.global_pool,
        "must be token, avg or tokens",
    )
    check(config.stem in (None, "linear", "conv"), "stem", config.stem, "must be linear or conv")
    check(config.feature_blocks >= 1, "feature_blocks", config.feature_blocks, "must be >= 1")
    check_positive(config, "", "img_size", "patch_size", "labels_per_class")
    if config.labels_per_class is not None and config.label_fraction is not None:
        raise ConfigError("give labels_per_class or label_fraction, not both")
    budgets = getattr(config, "budgets", None)
    if budgets and (config.labels_per_class is not None or config.label_fraction is not None):
        raise ConfigError(
            f"budgets={budgets!r} sets the label budget of every run: drop labels_per_class and label_fraction"
        )
    check(
        config.label_fraction is None or 0 < config.label_fraction <= 1,
        "label_fraction",
        config.label_fraction,
        "must be in (0, 1]",
    )
    check_precision(config.mixed_precision)
    d = config.data
    check_source(d)
    check(d.crop_pct is None or 0 < d.crop_pct <= 1, "data.crop_pct", d.crop_pct, "must be in (0, 1]")
    check_positive(d, "data.", "batch_size", "test_limit")
    for section, checker in (("knn", _check_knn), ("probe", _check_probe), ("finetune", _check_finetune)):
        if (settings := getattr(config, section, None)) is not None:
            checker(settings)
    seeds = getattr(config, "label_seeds", None)
    if seeds is not None:
        check(
            len(seeds) >= 2 and len(set(seeds)) == len(seeds) and min(seeds) >= 0,
            "label_seeds",
            seeds,
            "must be two or more different seeds >= 0, e.g. label_seeds=[0,1,2]",
        )
        check(config.seeded_budgets >= 1, "seeded_budgets", config.seeded_budgets, "must be >= 1")
    for name in getattr(config, "readouts", None) or []:
        check(name in CLASSIFIER_POOLS, "readouts", name, f"must be among {', '.join(CLASSIFIER_POOLS)}")
    for name in getattr(config, "baselines", []):
        check(name in BASELINES, "baselines", name, f"must be among {', '.join(BASELINES)} (or none)")
    for budget in getattr(config, "finetune_recipes", None) or {}:
        per_class_ok = budget == BUDGET_ALL or (budget.isdigit() and int(budget) > 0)
        check(per_class_ok, "finetune_recipes", budget, "keys are labels per class (e.g. 10) or all")
        budget_finetune(replace(config, budgets=None, label_fraction=None, labels_per_class=per_class_of(budget)))
    cnn = getattr(config, "cnn", None)
    if cnn is not None:
        check(len(cnn.widths) == 4, "cnn.widths", cnn.widths, "needs four stage widths (a ResNet has four stages)")
        check(len(cnn.blocks) == 4, "cnn.blocks", cnn.blocks, "needs four block counts (a ResNet has four stages)")
        check(all(v > 0 for v in [*cnn.widths, *cnn.blocks]), "cnn.widths", cnn.widths, "must be positive")
        check(all(v > 0 for v in cnn.blr_sweep), "cnn.blr_sweep", cnn.blr_sweep, "must be positive")
        cap = cnn.blr_sweep_max_per_class
        check(cap is None or cap >= 1, "cnn.blr_sweep_max_per_class", cap, "must be >= 1 (or null: every budget)")
        needs_val = bool(cnn.blr_sweep) and "cnn" in getattr(config, "baselines", [])
        check(not needs_val or bool(config.data.val_size), "cnn.blr_sweep", cnn.blr_sweep,
              "chooses on validation images: set data.val_size")  # fmt: skip


def per_class_of(budget: int | str) -> int | None:
    """Labels per class of a budget (``10`` or ``"10"``); ``None`` for ``all``."""
    return None if budget == BUDGET_ALL else int(budget)


def _check_knn(knn: KnnSettings) -> None:
    check_positive(knn, "knn.", "k", "temperature", "query_chunk")


def _check_probe(probe: ProbeSettings) -> None:
    check(probe.mode in PROBE_MODES, "probe.mode", probe.mode, f"must be one of {PROBE_MODES}")
    _check_schedule(probe, "probe.")
    check(
        not (probe.minutes and probe.mode == "cached"),
        "probe.minutes",
        probe.minutes,
        "applies to probe.mode=full only (the cached probe takes seconds)",
    )
    check(
        len(probe.blr_sweep) > 0 and all(b > 0 for b in probe.blr_sweep),
        "probe.blr_sweep",
        probe.blr_sweep,
        "must be a non-empty list of positive values",
    )
    wds = probe.wd_sweep
    check(wds is None or (len(wds) > 0 and min(wds) >= 0), "probe.wd_sweep", wds, "must be a list of values >= 0")
    check(0 < probe.val_fraction < 1, "probe.val_fraction", probe.val_fraction, "must be in (0, 1)")
    check(0 <= probe.momentum < 1, "probe.momentum", probe.momentum, "must be in [0, 1)")


def _check_finetune(ft: FinetuneSettings) -> None:
    _check_schedule(ft, "finetune.")
    from mpp.models.classifier import CLASSIFIER_POOLS

    pools = (None, *CLASSIFIER_POOLS)
    check(ft.global_pool in pools, "finetune.global_pool", ft.global_pool, "must be token, avg or tokens")
    check(0 < ft.layer_decay <= 1, "finetune.layer_decay", ft.layer_decay, "must be in (0, 1]")
    check(0 <= ft.drop_path_rate < 1, "finetune.drop_path_rate", ft.drop_path_rate, "must be in [0, 1)")
    check(0 <= ft.smoothing < 1, "finetune.smoothing", ft.smoothing, "must be in [0, 1)")
    check(ft.mixup >= 0, "finetune.mixup", ft.mixup, "must be >= 0 (0 turns mixup off)")
    check(ft.cutmix >= 0, "finetune.cutmix", ft.cutmix, "must be >= 0 (0 turns cutmix off)")
    for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
        check(0 <= getattr(ft, name) <= 1, f"finetune.{name}", getattr(ft, name), "must be in [0, 1]")
    check(0 < ft.ema_decay < 1, "finetune.ema_decay", ft.ema_decay, "must be in (0, 1)")
    check(ft.head_init in ("random", "probe"), "finetune.head_init", ft.head_init, "must be random or probe")
    semi = ft.semi
    check(
        semi.method in ("selftrain", "fixmatch"), "finetune.semi.method", semi.method, "must be selftrain or fixmatch"
    )
    check(semi.mu >= 1, "finetune.semi.mu", semi.mu, "must be >= 1")
    check(semi.weight >= 0, "finetune.semi.weight", semi.weight, "must be >= 0")
    check(not (semi.ema_teacher and not ft.ema), "finetune.semi.ema_teacher", True, "needs finetune.ema=true")
    check(semi.rounds >= 1, "finetune.semi.rounds", semi.rounds, "must be >= 1")
    share = semi.labelled_share
    check(0 <= share < 1, "finetune.semi.labelled_share", share, "must be in [0, 1)")
    selftrain = semi.enabled and semi.method == "selftrain"
    check(not (selftrain and ft.head_init == "probe"), "finetune.head_init", ft.head_init,
          "is not for semi.method=selftrain (each round builds its own head)")  # fmt: skip
    threshold_ok = semi.threshold is None or 0 <= semi.threshold < 1
    check(threshold_ok, "finetune.semi.threshold", semi.threshold, "must be in [0, 1)")
    for name in ("per_class", "pool_limit"):
        value = getattr(semi, name)
        check(value is None or value > 0, f"finetune.semi.{name}", value, "must be positive")

    if ft.rand_augment is not None:
        check(
            ft.rand_augment.startswith("rand-"),
            "finetune.rand_augment",
            ft.rand_augment,
            "must be a timm RandAugment string like rand-m9-mstd0.5-inc1, or null",
        )
