"""The data-efficiency sweep of ``mpp evaluate budgets=...``: budget parsing, the efficiency files, the random-init
baseline, the feature cache, and single-budget evaluation left as it was."""

import json
from dataclasses import replace

import pytest
import torch
import yaml
from accelerate import Accelerator
from PIL import Image

import mpp
from mpp.cli import main as cli_main
from mpp.config import ConfigError, EvaluateConfig, build_config, from_dict, to_dict
from mpp.config.stages import parse_budgets
from mpp.data.transforms import eval_transform
from mpp.eval.efficiency import COLOURS, best_of, finished_run
from mpp.eval.features import FeatureCache, extract_split_features
from mpp.eval.session import build_splits, open_encoder
from mpp.formats.native import save_encoder
from mpp.models.classifier import ViTClassifier
from mpp.runtime import read_config

MICRO = "mae_vit_micro_patch4"  # 64-d, 2 blocks, 28x28 grey
RANDOM = ["init=random", f"model={MICRO}"]
# 64 synthetic images of 4 balanced classes: 16 per class, so budgets=1,4,all ends at 16 labels per class.
SYNTH = ["data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0", "data.batch_size=64",
         "progress=false", "probe.mode=cached", "probe.epochs=2", "probe.warmup_epochs=1",
         "probe.blr_sweep=[0.1,1.0]", "finetune.epochs=1", "finetune.warmup_epochs=0", "finetune.batch_size=16",
         "finetune.rand_augment=null", "finetune.mixup=0", "finetune.cutmix=0", "cnn.widths=[8,8,8,8]",
         "baselines=none"]  # fmt: skip


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained")
    # avg pooling, unlike the registry variant's default (token): the baseline must follow the run, not the registry
    encoder = mpp.create_model(MICRO, global_pool="avg")
    save_encoder(encoder, run / "encoder.safetensors", variant=MICRO, mean=[0.34], std=[0.22])
    return run


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, encoder_run):
    from accelerate.state import AcceleratorState, GradientState, PartialState

    out = tmp_path_factory.mktemp("sweep")
    args = ["evaluate", str(encoder_run), *SYNTH, "budgets=1,4,all", "baselines=pixels,cnn", f"output_dir={out}"]
    assert cli_main(args) == 0
    # Module-scoped, so conftest's per-test reset of accelerate's singletons does not cover it.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    return out


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("1,10,100,all", [1, 10, 100, "all"]),
        ("[1, 10, all]", [1, 10, "all"]),
        ("10", [10]),
        ("all", ["all"]),
        (" 4 , 2,ALL,2", [2, 4, "all"]),  # sorted, repeats dropped, any case
    ],
)
def test_budgets_from_the_command_line(given, expected):
    config = build_config(EvaluateConfig, None, [*RANDOM, f"budgets={given}"])
    assert config.budgets == expected


def test_budgets_from_a_recipe_list(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("budgets: [100, 1, all]\n")
    assert build_config(EvaluateConfig, recipe, RANDOM).budgets == [1, 100, "all"]
    assert build_config(EvaluateConfig, None, RANDOM).budgets is None  # unset by default


@pytest.mark.parametrize(
    ("given", "shown"),
    [("0", "0"), ("1,x", "'1,x'"), ("-3", "-3"), ("[]", "[]"), ("1.5", "1.5"), ("true", "True"), ("[1, 2.5]", "2.5")],
)
def test_bad_budgets_name_the_key_and_value(given, shown):
    with pytest.raises(ConfigError, match="budgets") as err:
        build_config(EvaluateConfig, None, [*RANDOM, f"budgets={given}"])
    assert shown in str(err.value) and "\n" not in str(err.value)


def test_budgets_exclude_a_single_budget():
    with pytest.raises(ConfigError, match="budgets=.*drop labels_per_class"):
        build_config(EvaluateConfig, None, [*RANDOM, "budgets=1,10", "labels_per_class=5"])
    assert parse_budgets(None) is None


# ------------------------------------------------------------------------------------------------ the sweep
def test_sweep_writes_one_entry_per_budget_per_encoder(sweep_dir):
    report = json.loads((sweep_dir / "efficiency.json").read_text())
    assert report["budgets"] == [1, 4, "all"] and report["protocols"] == ["knn", "probe", "logistic", "finetune"]
    assert report["variant"] == MICRO and report["dataset"] == "synthetic" and report["num_classes"] == 4
    assert list(report["encoders"]) == ["mae", "scratch", "cnn", "pixels"]
    for role, entry in report["encoders"].items():
        points = entry["results"]
        assert [p["budget"] for p in points] == [1, 4, "all"]
        assert [p["train_used"] for p in points] == [4, 16, 64]
        assert [p["labels_per_class"] for p in points] == [1, 4, 16]  # "all" at its real per-class count
        assert [p["output_dir"] for p in points] == [f"{role}/1_per_class", f"{role}/4_per_class", f"{role}/all"]
        for p in points:
            run = json.loads((sweep_dir / p["output_dir"] / "results.json").read_text())
            assert p["top1"] == {name: e["top1"] for name, e in run["protocols"].items()}


def test_sweep_protocols_of_each_encoder_and_baseline(sweep_dir):
    encoders = json.loads((sweep_dir / "efficiency.json").read_text())["encoders"]
    for role in ("mae", "scratch"):
        first, *rest = encoders[role]["results"]
        # The cached probe cannot hold out a validation split from one image per class: left out, with the reason.
        assert set(first["top1"]) == {"knn"} and "validation split" in first["skipped"]["probe"]
        assert all(set(p["top1"]) == {"knn", "probe"} and not p["skipped"] for p in rest)
    pixels, cnn = encoders["pixels"]["results"], encoders["cnn"]["results"]
    assert set(pixels[0]["top1"]) == {"knn"} and "data.val_size" in pixels[0]["skipped"]["logistic"]
    assert all(set(p["top1"]) == {"knn", "logistic"} for p in pixels[1:])
    assert all(set(p["top1"]) == {"finetune"} for p in cnn) and encoders["cnn"]["variant"] == "resnet"
    run = json.loads((sweep_dir / "cnn/4_per_class/results.json").read_text())
    assert run["protocols"]["finetune"]["steps"] >= 1 and run["protocols"]["finetune"]["train_minutes"] >= 0
    # The pixels see exactly the labelled images the encoders see.
    assert json.loads((sweep_dir / "pixels/4_per_class/results.json").read_text())["labels"] == run["labels"]


def test_small_budgets_over_label_seeds_report_mean_and_spread(tmp_path, encoder_run):
    out = tmp_path / "seeds"
    args = ["evaluate", str(encoder_run), *SYNTH, "budgets=2,all", "label_seeds=[0,1,2]", "seeded_budgets=2",
            "compare_random=false", f"output_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    small, whole = json.loads((out / "efficiency.json").read_text())["encoders"]["mae"]["results"]
    knn = small["top1_by_seed"]["knn"]
    assert len(knn) == 3 and small["top1"]["knn"] == pytest.approx(sum(knn) / 3) and small["spread"]["knn"] >= 0
    subsets = [json.loads((out / f"mae/2_per_class/labels{s}/results.json").read_text())["labels"] for s in (0, 1, 2)]
    assert [s["label_seed"] for s in subsets] == [0, 1, 2] and "top1_by_seed" not in whole  # "all" has one subset
    assert "±" in (out / "efficiency.md").read_text()

    # Run again into the same directory: finished runs are reused, a run cut before its results.json runs again.
    marked = out / "mae/2_per_class/labels0/results.json"
    results = json.loads(marked.read_text())
    results["protocols"]["knn"]["top1"] = 12.5  # a reused run is read back, not measured again
    marked.write_text(json.dumps(results))
    (out / "mae/2_per_class/labels1/results.json").unlink()
    assert cli_main([a.replace("label_seeds=[0,1,2]", "label_seeds=[0,1,2,3]") for a in args]) == 0
    again = json.loads((out / "efficiency.json").read_text())["encoders"]["mae"]["results"][0]["top1_by_seed"]["knn"]
    assert again[:3] == [12.5, knn[1], knn[2]]  # seed 0 reused; seed 1 measured again, to the same figure
    assert len(again) == 4  # a seed added to the sweep is measured; the others are not
    assert (out / "mae/2_per_class/labels1/results.json").is_file()
    done = out / "mae/2_per_class/labels2"
    saved = from_dict(EvaluateConfig, read_config(done / "config.yaml"))
    assert finished_run(done, replace(saved, progress=True))  # how a run reports is not what it measures
    older = yaml.safe_load((done / "config.yaml").read_text())
    del older["knn"]["query_chunk"]  # saved before mpp had the setting: it counts at its default
    (done / "config.yaml").write_text(yaml.safe_dump(older))
    assert finished_run(done, saved)
    other = replace(saved, knn=replace(saved.knn, k=saved.knn.k + 1))
    assert not finished_run(done, other)  # another setting: measured again
    # A CNN setting the run never read (cnn.blr at a budget the lr grid covers) does not stop its reuse; the grid does.
    gridded = replace(saved, cnn=replace(saved.cnn, blr_sweep=[1e-2, 3e-2]))
    (done / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(yaml.safe_dump(to_dict(gridded)))))
    assert finished_run(done, replace(gridded, cnn=replace(gridded.cnn, blr=5e-2)))
    assert not finished_run(done, replace(gridded, cnn=replace(gridded.cnn, blr_sweep=[1e-2])))


def test_sweep_table_and_plot(sweep_dir):
    table = (sweep_dir / "efficiency.md").read_text()
    assert (
        "| MAE kNN | MAE linear probe | ViT scratch kNN | ViT scratch linear probe | CNN scratch fine-tune |" in table
    )
    assert "| pixels kNN | pixels logistic regression | MAE best - best baseline (which) |" in table
    rows = [line for line in table.splitlines() if line.startswith(("| 1 |", "| 4 |", "| all (16) |"))]
    assert len(rows) == 3 and "n/a" in rows[0] and "n/a" not in rows[1]
    cost = [line for line in table.splitlines() if line.startswith("| CNN scratch fine-tune | ")]
    assert len(cost) == 1 and cost[0].count(" steps, ") == 3, cost  # what the baseline trained for, every budget
    assert "efficiency.png" in table
    with Image.open(sweep_dir / "efficiency.png") as img:
        img.verify()
    with Image.open(sweep_dir / "efficiency.png") as img:
        assert img.format == "PNG" and img.size == (960, 560)
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    # MAE kNN and probe drawn solid; ViT scratch kNN and probe, CNN, pixels kNN and LR dashed (anti-aliased: near).
    assert COLOURS[0] in colours and COLOURS[1] in colours
    assert all(any(sum(abs(a - b) for a, b in zip(c, p, strict=True)) < 40 for p in colours) for c in COLOURS[2:7])
    assert not any(sum(abs(a - b) for a, b in zip(COLOURS[8], p, strict=True)) < 10 for p in colours)  # 7 curves


def test_random_baseline_has_the_encoders_variant_and_inputs(sweep_dir):
    results = json.loads((sweep_dir / "scratch/4_per_class/results.json").read_text())
    assert results["init"] == "random" and results["variant"] == MICRO
    assert results["global_pool"] == "avg"  # read out like the pretrained encoder
    config = yaml.safe_load((sweep_dir / "scratch/4_per_class/config.yaml").read_text())
    assert config["init"] == "random" and config["model"] == MICRO and config["budgets"] is None
    assert config["data"]["mean"] == [0.34] and config["data"]["std"] == [0.22]  # the encoder's normalisation
    assert yaml.safe_load((sweep_dir / "mae/4_per_class/config.yaml").read_text())["labels_per_class"] == 4


def test_sweep_matches_single_budget_runs_and_single_budget_is_unchanged(tmp_path, encoder_run, sweep_dir):
    out = tmp_path / "single"
    assert cli_main(["evaluate", str(encoder_run), *SYNTH, "labels_per_class=4", f"output_dir={out}"]) == 0
    assert not list(out.glob("efficiency*")) and not (out / "mae").exists()
    single = json.loads((out / "results.json").read_text())
    assert set(single["protocols"]) == {"knn", "probe"} and "skipped" not in single
    swept = json.loads((sweep_dir / "mae/4_per_class/results.json").read_text())
    # Cached features sliced to the budget give the kNN of features extracted for the budget alone.
    assert swept["protocols"]["knn"]["top1"] == single["protocols"]["knn"]["top1"]
    assert swept["labels"] == single["labels"]


def test_feature_cache_slices_like_extraction():
    config = build_config(EvaluateConfig, None, [f"model={MICRO}", *SYNTH], init="random")
    encoder, _ = open_encoder(config)
    tf = eval_transform(encoder.img_size, [0.5], [0.5])
    classifier = ViTClassifier(encoder, 4, head_bn=True)
    accelerator = Accelerator(cpu=True)
    cache = FeatureCache()
    for per_class in (2, 5):  # the first call fills the cache, the second only slices it
        splits = build_splits(build_config(EvaluateConfig, None, [f"model={MICRO}", *SYNTH,
                              f"labels_per_class={per_class}"], init="random"), encoder, tf, tf)  # fmt: skip
        cached = cache.features(classifier, splits, accelerator, 16, 0, False)
        direct = extract_split_features(classifier, splits, accelerator, 16, 0, False)
        assert cached[0].shape == (4 * per_class, 64)
        for a, b in zip(cached, direct, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_no_baseline_and_unknown_variant(tmp_path, encoder_run, capsys):
    out = tmp_path / "alone"
    args = ["evaluate", str(encoder_run), *SYNTH, "budgets=all", "compare_random=false", f"output_dir={out}"]
    assert cli_main(args) == 0
    report = json.loads((out / "efficiency.json").read_text())
    assert list(report["encoders"]) == ["mae"] and "best baseline" not in (out / "efficiency.md").read_text()
    anonymous = tmp_path / "anonymous"
    save_encoder(mpp.create_model(MICRO), anonymous / "encoder.safetensors")  # no variant recorded
    assert cli_main(["evaluate", str(anonymous), *SYNTH, "budgets=4", f"output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model=<registry name>" in err and "\n" not in err
    assert not (tmp_path / "x").exists()  # refused before any run


def test_too_large_a_budget_fails_before_the_first_run(tmp_path, encoder_run, capsys):
    out = tmp_path / "big"
    assert cli_main(["evaluate", str(encoder_run), *SYNTH, "budgets=1,1000", f"output_dir={out}"]) == 2
    assert "labels_per_class=1000" in capsys.readouterr().err and not out.exists()


def test_best_column_is_chosen_on_validation_not_test():
    # The probe wins on test but the kNN wins on validation: the table reports the kNN's test figure.
    mae = {"top1": {"knn": 70.0, "probe": 75.0}, "val_top1": {"knn": 72.0, "probe": 71.0}}
    assert best_of([("mae", mae)]) == (70.0, "MAE kNN")
    unvalidated = {"top1": {"knn": 70.0, "probe": 75.0}, "val_top1": {}}
    assert best_of([("mae", unvalidated)]) == (75.0, "MAE linear probe, by test: no validation split")


def test_extra_readout_is_the_same_as_a_lone_run_of_it(tmp_path):
    # avg pooling drops the encoder's final norm in place; the tokens readout beside it must still read the normed
    # tokens (a norm far from identity here), exactly as a lone run with global_pool=tokens does.
    torch.manual_seed(0)
    encoder = mpp.create_model(MICRO, global_pool="avg")
    torch.nn.init.normal_(encoder.norm.weight, 1.0, 0.5)
    torch.nn.init.normal_(encoder.norm.bias, 0.0, 1.0)
    save_encoder(encoder, tmp_path / "encoder.safetensors", variant=MICRO, mean=[0.34], std=[0.22])
    both, lone, init = tmp_path / "both", tmp_path / "lone", str(tmp_path / "encoder.safetensors")
    assert cli_main(["evaluate", init, *SYNTH, "readouts=tokens", "data.val_size=8", f"output_dir={both}"]) == 0
    assert cli_main(["knn", init, *SYNTH[:5], "global_pool=tokens", "data.val_size=8", f"output_dir={lone}"]) == 0
    protocols = json.loads((both / "results.json").read_text())["protocols"]
    assert set(protocols) == {"knn", "probe", "knn_tokens", "probe_tokens"}
    alone = json.loads((lone / "results.json").read_text())["protocols"]["knn"]
    assert protocols["knn_tokens"]["confusion"] == alone["confusion"]
    assert protocols["knn_tokens"]["val_top1"] == alone["val_top1"]
    with pytest.raises(ConfigError, match="readouts"):
        build_config(EvaluateConfig, None, [*RANDOM, "readouts=tokens,max"])


def test_semi_supervised_fine_tune_is_a_column_beside_labels_only(tmp_path, encoder_run):
    out = tmp_path / "semi"
    args = ["evaluate", str(encoder_run), *SYNTH, "budgets=2", "run_finetune=true", "finetune.semi.enabled=true",
            "finetune.semi.rounds=1", "finetune.semi.threshold=0.0", "compare_random=false", "data.val_size=8",
            f"output_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    run = out / "mae" / "2_per_class"
    protocols = json.loads((run / "results.json").read_text())["protocols"]
    assert {"finetune", "finetune_semi"} <= set(protocols)  # round 0 (labels only) beside the chosen round
    assert protocols["finetune_semi"]["semi"]["method"] == "selftrain" and "semi" not in protocols["finetune"]
    assert (run / "finetune" / "round_1").is_dir() and not (out / "round_0").exists()  # rounds live in the budget's dir
    assert "| MAE fine-tune | MAE semi-supervised fine-tune |" in (out / "efficiency.md").read_text()


def test_each_budget_fine_tunes_with_its_own_recipe(tmp_path, encoder_run):
    recipe = tmp_path / "ft4.yaml"  # a fine-tune recipe as shipped ones are: its own section, its head's readout
    recipe.write_text("global_pool: tokens\nfinetune:\n  epochs: 1\n  warmup_epochs: 0\n  batch_size: 16\n"
                      "  blr: 0.02\n  rand_augment: null\n  mixup: 0\n  cutmix: 0\n")  # fmt: skip
    out = tmp_path / "sweep"
    args = ["evaluate", str(encoder_run), *SYNTH, "budgets=1,4", "run_finetune=true", "compare_random=false",
            f"finetune_recipes={{4: {recipe}}}", f"output_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    for budget, pool, blr in (("1_per_class", None, "blr 0.0005"), ("4_per_class", "tokens", "blr 0.02")):
        assert yaml.safe_load((out / "mae" / budget / "config.yaml").read_text())["finetune"]["global_pool"] == pool
        entry = json.loads((out / "mae" / budget / "results.json").read_text())["protocols"]["finetune"]
        assert blr in entry["summary"] and entry["global_pool"] == (pool or "avg")  # the head was built on it


def test_budget_recipes_replace_the_fine_tune_section_but_keep_semi(tmp_path):
    from dataclasses import replace

    from mpp.config.stages import at_budget

    base = [*RANDOM, "finetune.blr=0.1", "finetune.semi.enabled=true"]
    config = build_config(
        EvaluateConfig, None, [*base, "finetune_recipes={10: finetune_fmnist_100, all: finetune_fmnist}"]
    )
    at_10 = at_budget(replace(config, labels_per_class=10)).finetune
    assert (at_10.blr, at_10.min_steps, at_10.global_pool, at_10.semi.enabled) == (6e-3, 600, "tokens", True)
    assert at_budget(replace(config, labels_per_class=5)).finetune.blr == 0.1  # no entry: the sweep's own section
    assert at_budget(config).finetune.epochs == 8  # neither labels_per_class nor label_fraction: all
    for bad, shown in (("{ten: finetune_fmnist}", "finetune_recipes='ten'"),
                       ("{10: fmnist_tiny}", "finetune_recipes.10=fmnist_tiny: not a fine-tune recipe"),
                       (f"{{10: {tmp_path / 'none.yaml'}}}", "does not exist")):  # fmt: skip
        with pytest.raises(ConfigError, match=shown):
            build_config(EvaluateConfig, None, [*base, f"finetune_recipes={bad}"])


def test_cnn_lr_is_chosen_on_validation(tmp_path, encoder_run, capsys):
    out, lone = tmp_path / "sweep", tmp_path / "lone"
    common = [*SYNTH, "budgets=4", "compare_random=false", "baselines=cnn", "data.val_size=8"]
    assert cli_main(["evaluate", str(encoder_run), *common, "cnn.blr_sweep=[1e-5,1e-2]", f"output_dir={out}"]) == 0
    cnn = json.loads((out / "cnn/4_per_class/results.json").read_text())["protocols"]["finetune"]
    by_blr = cnn["val_top1_by_blr"]
    assert set(by_blr) == {"1e-05", "0.01"} and cnn["val_top1"] == max(by_blr.values())
    assert cnn["blr"] == float(max(by_blr, key=by_blr.get))
    # Each lr starts from the same weights and batches: the chosen one is a lone run at that lr.
    # Above blr_sweep_max_per_class the CNN trains once, at cnn.blr (not the ViT recipe's finetune.blr).
    once = ["cnn.blr_sweep=[1e-5,1e-2]", "cnn.blr_sweep_max_per_class=2", f"cnn.blr={cnn['blr']}", "finetune.blr=1e-9"]
    assert cli_main(["evaluate", str(encoder_run), *common, *once, f"output_dir={lone}"]) == 0
    assert not list((lone / "cnn/4_per_class").glob("blr*"))
    alone = json.loads((lone / "cnn/4_per_class/results.json").read_text())["protocols"]["finetune"]
    assert (alone["top1"], alone["val_top1"]) == (cnn["top1"], cnn["val_top1"])
    no_val = [a for a in common if not a.startswith("data.val_size")]
    refused = tmp_path / "refused"
    assert cli_main(["evaluate", str(encoder_run), *no_val, "cnn.blr_sweep=[1e-3]", f"output_dir={refused}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cnn.blr_sweep" in err and "data.val_size" in err and not refused.exists()
