"""Evaluation protocols: kNN against a brute-force reference, probes and kNN on separable data, layer decay, the
classifier head, fine-tuning at a new resolution, init errors, and the CLI stages end to end on synthetic data."""

import json
import math

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

import mpp
from mpp.cli import main as cli_main
from mpp.config import ProbeSettings
from mpp.eval.encoders import InitError, load_init
from mpp.eval.metrics import classification_metrics, confusion_matrix
from mpp.eval.probe import cached_probe, head_logits, train_cached_heads
from mpp.eval.session import make_trainable_grid
from mpp.formats.native import load_classifier, save_encoder
from mpp.models.classifier import ViTClassifier
from mpp.neighbours import knn_scores
from mpp.pos_embed import resize_pos_embed
from mpp.train.optim import layer_decay_param_groups, vit_layer_id

MICRO = "mae_vit_micro_patch4"  # 64-d, 2 blocks, 28x28 grey


def clusters(n_per_class: int, num_classes: int = 4, dim: int = 16, seed: int = 0, spread: float = 0.6):
    """Gaussian clusters around fixed random centres (``seed`` draws the samples); separable, not trivially."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    centres = torch.nn.functional.normalize(centres, dim=1) * 2
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


# ------------------------------------------------------------------------------------------------ kNN
def brute_force_knn(bank, bank_labels, queries, num_classes, k, temperature):
    bank = bank / bank.norm(dim=1, keepdim=True)
    out = torch.zeros(len(queries), num_classes)
    for q, query in enumerate(queries):
        query = query / query.norm()
        sims = [(float(query @ b), int(label)) for b, label in zip(bank, bank_labels, strict=True)]
        for sim, label in sorted(sims, reverse=True)[:k]:
            out[q, label] += math.exp(sim / temperature)
    return out


def test_knn_matches_brute_force_exactly():
    bank, bank_labels = clusters(15, num_classes=3, dim=8, seed=1, spread=1.5)
    queries, _ = clusters(7, num_classes=3, dim=8, seed=2, spread=1.5)
    fast = knn_scores(bank, bank_labels, queries, 3, k=5, temperature=0.1, chunk=4)  # several chunks
    slow = brute_force_knn(bank, bank_labels, queries, 3, k=5, temperature=0.1)
    assert torch.equal(fast.argmax(1), slow.argmax(1))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_knn_separates_clusters_and_caps_k():
    bank, bank_labels = clusters(40, seed=0)
    test, test_labels = clusters(25, seed=1)
    scores = knn_scores(bank, bank_labels, test, 4, k=20, temperature=0.07)
    assert (scores.argmax(1) == test_labels).float().mean() > 0.9  # chance is 0.25
    assert knn_scores(bank[:3], bank_labels[:3], test, 4, k=20).shape == (100, 4)  # k > bank size


# ------------------------------------------------------------------------------------------------ probe
def test_cached_probe_sweep_separates_clusters_and_chooses_on_val():
    train, train_labels = clusters(60, seed=0)
    test, test_labels = clusters(25, seed=1)
    settings = ProbeSettings(mode="cached", epochs=30, warmup_epochs=3, batch_size=64, blr_sweep=[0.1, 100.0])
    entry = cached_probe(train, train_labels, test, test_labels, ["a", "b", "c", "d"], settings,
                         Accelerator(cpu=True), seed=0, say=lambda _: None)  # fmt: skip
    assert entry["top1"] > 85  # chance is 25
    assert entry["val_size"] == 24 and entry["train_size"] == 216  # 10% of each class held out of train
    # LARS moves weights by a fraction of their norm: 90 steps need a large lr, and validation finds it.
    assert entry["chosen_blr"] == 100.0
    assert entry["sweep"][0]["val_top1"] < entry["sweep"][1]["val_top1"]
    assert len(entry["confusion"]) == 4 and sum(map(sum, entry["confusion"])) == 100


def test_heads_of_a_sweep_train_independently():
    feats, labels = clusters(20, seed=3)
    settings = ProbeSettings(mode="cached", epochs=3, warmup_epochs=1)
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    both = train_cached_heads(feats, labels, 4, [0.5, 0.05], settings, acc, batch_size=16, seed=0)
    torch.manual_seed(0)
    alone = train_cached_heads(feats, labels, 4, [0.5], settings, acc, batch_size=16, seed=0)
    # Head 0 starts from the same weights and sees the same batches: training a second head beside it changes nothing.
    torch.testing.assert_close(both.heads[0].weight, alone.heads[0].weight)
    torch.testing.assert_close(both.heads[0].bias, alone.heads[0].bias)
    assert not torch.allclose(both.heads[0].weight, both.heads[1].weight)
    assert head_logits(both, feats).shape == (2, 80, 4)


def test_weight_decay_sweep_gives_each_head_its_own_decay_and_chooses_on_val():
    feats, labels = clusters(20, seed=3)
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    grid = train_cached_heads(feats, labels, 4, [0.5, 0.5], ProbeSettings(epochs=3, warmup_epochs=1), acc, 16,
                              weight_decays=[0.5, 0.0])  # fmt: skip
    torch.manual_seed(0)
    decayed = train_cached_heads(feats, labels, 4, [0.5], ProbeSettings(epochs=3, warmup_epochs=1, weight_decay=0.5),
                                 acc, 16)  # fmt: skip
    torch.manual_seed(0)
    plain = train_cached_heads(feats, labels, 4, [0.5], ProbeSettings(epochs=3, warmup_epochs=1), acc, 16)
    torch.testing.assert_close(grid.heads[0].weight, decayed.heads[0].weight)  # as a lone run with that decay
    assert not torch.allclose(decayed.heads[0].weight, plain.heads[0].weight)  # which the decay changed
    test, test_labels = clusters(10, seed=1)
    settings = ProbeSettings(mode="cached", epochs=4, warmup_epochs=0, batch_size=64, blr_sweep=[1.0, 10.0],
                             wd_sweep=[0.0, 1e-2, 1e-1])  # fmt: skip
    entry = cached_probe(feats, labels, test, test_labels, list("abcd"), settings, acc, say=lambda _: None)
    assert [(s["blr"], s["weight_decay"]) for s in entry["sweep"]] == [(b, w) for w in (0, 1e-2, 1e-1) for b in (1, 10)]
    best = max(entry["sweep"], key=lambda s: s["val_top1"])
    assert entry["val_top1"] == best["val_top1"] and "wd" in entry["summary"]


def test_a_diverging_head_leaves_the_sweep_alone():
    feats, labels = clusters(60, seed=0)
    test, test_labels = clusters(10, seed=1)
    settings = ProbeSettings(mode="cached", epochs=4, warmup_epochs=0, batch_size=64, blr_sweep=[1.0, 1e30])
    entry = cached_probe(feats, labels, test, test_labels, list("abcd"), settings, Accelerator(cpu=True),
                         say=lambda _: None)  # fmt: skip
    assert entry["sweep"][1]["val_top1"] is None and entry["chosen_blr"] == 1.0


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_topk_per_class_and_confusion():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    target = torch.tensor([0, 1, 1, 2])
    m = classification_metrics(scores, target, ["x", "y", "z"])
    assert m["top1"] == 75.0 and m["top5"] == 100.0
    assert m["per_class"] == {"x": 100.0, "y": 50.0, "z": 100.0}
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert confusion_matrix(target, target, 3).trace() == 4


# ------------------------------------------------------------------------------------------------ model pieces
def micro_encoder(**kw) -> mpp.ViTEncoder:
    encoder, _ = load_init("random", MICRO, **kw)
    return encoder


def test_classifier_pooling_as_official():
    torch.manual_seed(0)
    imgs = torch.randn(2, 1, 28, 28)
    enc = micro_encoder().eval()
    token = ViTClassifier(enc, 5, "token").eval()
    torch.testing.assert_close(token.forward_features(imgs), enc.forward_features(imgs)[:, 0])
    enc2 = micro_encoder().eval()
    blocks_out = enc2.prepend_cls(enc2.embed_patches(imgs))
    for block in enc2.blocks:
        blocks_out = block(blocks_out)
    avg = ViTClassifier(enc2, 5, "avg").eval()
    assert isinstance(enc2.norm, torch.nn.Identity)  # the final norm is dropped, fc_norm is fresh
    expected = torch.nn.functional.layer_norm(blocks_out[:, 1:].mean(1), (64,), eps=1e-6)
    torch.testing.assert_close(avg.forward_features(imgs), expected)
    assert avg(imgs).shape == (2, 5)
    assert avg.head.weight.std() < 1e-4 and torch.all(avg.head.bias == 0)  # trunc-normal 2e-5
    probe = ViTClassifier(micro_encoder(), 5, head_bn=True, head_init_std=0.01)
    assert isinstance(probe.head[0], torch.nn.BatchNorm1d) and not probe.head[0].affine


def test_layer_decay_matches_official_ids_and_scales():
    enc = micro_encoder()
    make_trainable_grid(enc, None, None)
    model = ViTClassifier(enc, 10, "avg")
    decay, depth = 0.65, 2
    groups = layer_decay_param_groups(model, 0.05, decay, depth)
    expected_ids = {"encoder.cls_token": 0, "encoder.pos_embed": 0, "encoder.patch_embed.proj.weight": 0,
                    "encoder.blocks.0.attn.qkv.weight": 1, "encoder.blocks.1.mlp.fc2.bias": 2,
                    "fc_norm.weight": 3, "head.weight": 3, "head.bias": 3}  # fmt: skip
    seen = {}
    for group in groups:
        for name in group["param_names"]:
            seen[name] = group
    assert set(seen) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, layer in expected_ids.items():
        assert vit_layer_id(name, depth) == layer
        assert seen[name]["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer))
    for name, group in seen.items():
        assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - vit_layer_id(name, depth)))
        param = dict(model.named_parameters())[name]
        no_decay = param.ndim == 1 or name in ("encoder.cls_token", "encoder.pos_embed")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_finetune_at_new_resolution_resizes_learnable_pos_table():
    enc = micro_encoder()
    with torch.no_grad():
        enc.pos_embed.add_(0.1 * torch.randn_like(enc.pos_embed))  # not a sin-cos table any more
    old = enc.pos_embed.detach().clone()
    make_trainable_grid(enc, 36, None)  # 7x7 -> 9x9 grid
    assert enc.pos_embed.shape == (1, 1 + 81, 64) and enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed.detach(), resize_pos_embed(old, (7, 7), (9, 9), 1))
    model = ViTClassifier(enc, 3, "avg")
    loss = model(torch.randn(2, 1, 36, 36)).logsumexp(1).sum()
    loss.backward()
    assert enc.pos_embed.grad is not None and enc.pos_embed.grad.abs().sum() > 0
    enc2 = micro_encoder()
    make_trainable_grid(enc2, None, 7)  # patch 4 -> 7: 4x4 grid at 28 px
    assert enc2.pos_embed.shape == (1, 17, 64) and enc2(torch.randn(1, 1, 28, 28)).shape == (1, 64)


def test_random_init_is_seeded():
    from mpp.config import KnnConfig, build_config
    from mpp.eval.session import open_encoder

    config = build_config(KnnConfig, None, [f"model={MICRO}", "seed=3"], init="random")
    a, _ = open_encoder(config)
    torch.rand(5)  # whatever ran before does not matter
    b, _ = open_encoder(config)
    torch.testing.assert_close(a.state_dict(), b.state_dict())


def test_init_errors_are_clear(tmp_path):
    with pytest.raises(InitError, match="no such file or directory"):
        load_init(str(tmp_path / "missing"))
    with pytest.raises(InitError, match="model="):
        load_init("random")
    with pytest.raises(InitError, match="required"):
        load_init(None)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    with pytest.raises(InitError, match="without encoder.safetensors"):
        load_init(str(run))


def test_init_from_encoder_file_keeps_weights_and_sets_drop_path(tmp_path):
    mae = mpp.create_model(MICRO)
    path = save_encoder(mae, tmp_path / "encoder.safetensors", mean=[0.3], std=[0.2], variant=MICRO)
    enc, meta = load_init(str(tmp_path), drop_path_rate=0.2)  # a run dir holding encoder.safetensors
    assert meta["mean"] == [0.3] and meta["variant"] == MICRO
    assert enc.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    key = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(enc.state_dict()[key], mae.state_dict()[key])
    enc2, _ = load_init(str(path))
    torch.testing.assert_close(enc2.patch_embed.proj.weight, mae.patch_embed.proj.weight)


# ------------------------------------------------------------------------------------------------ CLI
SYNTH = ["data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0", "data.batch_size=64",
         "progress=false"]  # fmt: skip


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pretrained")
    save_encoder(mpp.create_model(MICRO), run / "encoder.safetensors", variant=MICRO, mean=[0.34], std=[0.22])
    return run


def read_results(path):
    results = json.loads((path / "results.json").read_text())
    assert (path / "results.md").is_file() and (path / "config.yaml").is_file()
    for name in results["protocols"]:
        assert Image.open(path / f"confusion_{name}.png").size[0] > 100
    return results


def test_cli_knn_and_probe_with_label_budget(tmp_path, encoder_run):
    out = tmp_path / "knn"
    assert cli_main(["knn", str(encoder_run), *SYNTH, "labels_per_class=5", f"output_dir={out}"]) == 0
    res = read_results(out)
    assert res["labels"]["train_used"] == 20 and res["protocols"]["knn"]["bank_size"] == 20
    assert res["protocols"]["knn"]["n"] == 64
    out = tmp_path / "probe"
    args = ["probe", str(encoder_run), *SYNTH, "probe.mode=cached", "probe.epochs=2", "probe.warmup_epochs=1",
            "probe.blr_sweep=[0.1,1.0]", "label_fraction=0.5", f"output_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    res = read_results(out)
    assert res["labels"]["train_used"] == 32 and len(res["protocols"]["probe"]["sweep"]) == 2
    out = tmp_path / "probe_full"
    args = ["probe", str(encoder_run / "encoder.safetensors"), *SYNTH, "probe.epochs=1", "probe.warmup_epochs=0",
            "probe.batch_size=16", "global_pool=avg", f"output_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    res = read_results(out)
    assert res["protocols"]["probe"]["mode"] == "full" and res["global_pool"] == "avg"
    assert res["protocols"]["probe"]["steps"] == 4


def test_cli_finetune_from_scratch_at_new_resolution(tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", "init=random", f"model={MICRO}", *SYNTH, "img_size=32", "finetune.epochs=1",
            "finetune.warmup_epochs=0", "finetune.batch_size=16", "finetune.ema=true", "labels_per_class=8",
            f"output_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    res = read_results(out)
    assert set(res["protocols"]) == {"finetune", "finetune_ema"}
    assert res["encoder"]["img_size"] == [32, 32] and res["encoder"]["pos_embed"] == "learned"
    assert res["protocols"]["finetune"]["steps"] == 2  # 32 images / batch 16
    assert (out / "metrics.jsonl").is_file()
    model, meta = load_classifier(out / "classifier.safetensors")
    assert meta["classes"] == res["classes"] and model(torch.zeros(1, 1, 32, 32)).shape == (1, 4)


def test_cli_evaluate_writes_table(tmp_path, encoder_run):
    out = tmp_path / "eval"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("probe:\n  mode: cached\n  epochs: 2\n  warmup_epochs: 1\n")
    args = ["evaluate", str(encoder_run), *SYNTH, "--recipe", str(recipe), "--finetune", "finetune.epochs=1",
            "finetune.warmup_epochs=0", "finetune.batch_size=32", f"output_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    res = read_results(out)
    assert set(res["protocols"]) == {"knn", "probe", "finetune"}
    table = (out / "results.md").read_text()
    assert "| knn |" in table and "| probe |" in table and "| finetune |" in table and "disc" in table


def test_default_output_dirs_name_encoder_and_budget(encoder_run):
    from mpp.config import EvaluateConfig, build_config
    from mpp.eval.session import default_output_dir

    config = build_config(EvaluateConfig, None, ["labels_per_class=10"], init=str(encoder_run))
    assert default_output_dir(config, "eval") == encoder_run / "eval_10_per_class"
    config = build_config(EvaluateConfig, None, ["label_fraction=0.01", f"model={MICRO}", "seed=2"], init="random")
    assert str(default_output_dir(config, "probe")) == f"runs/probe/random_{MICRO}_1pct_seed2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["knn", "/no/such/run"], "no such file or directory"),
        (["knn", "init=random"], "model=<registry name>"),
        (["probe", "random", f"model={MICRO}", "labels_per_class=1000"], "labels_per_class=1000 but class"),
        (["finetune", "random", f"model={MICRO}", "finetune.layer_decay=2"], "finetune.layer_decay=2"),
        (
            ["finetune", "random", f"model={MICRO}", "finetune.head_init=probe", "finetune.semi.enabled=true"],
            "finetune.head_init='probe': is not for semi.method=selftrain",
        ),
        (["probe", "random", f"model={MICRO}", "probe.mode=fast"], "probe.mode='fast'"),
        (["knn", "random", f"model={MICRO}", "knn.kk=3"], "unknown config key 'knn.kk'"),
        (["evaluate", "a", "b"], None),
    ],
)
def test_cli_bad_input_is_one_line_error(args, message, capsys):
    if message is None:
        with pytest.raises(SystemExit):
            cli_main(args)
        return
    assert cli_main([*args, *SYNTH]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
