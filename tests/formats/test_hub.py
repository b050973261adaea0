"""Sharing an encoder: the model card of `mpp convert RUN DIR`, `mpp push` (up to the upload call), hf:// inits."""

import json
import shutil

import pytest
import yaml

from mpp.cli import main as cli_main
from mpp.config import PretrainConfig, build_config
from mpp.formats.hub import HubError, push_folder, resolve_init
from mpp.train import pretrain
from tests.pretrain_runs import TINY

SYNTH = ["data.source=synthetic", "data.synthetic_size=64", "data.num_workers=0", "progress=false"]


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, folder_path, repo_id, commit_message):
        self.calls.append(("upload_folder", folder_path, repo_id))
        return "https://huggingface.co/me/tiny/commit/0"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    run = root / "run"
    assert pretrain.main([*TINY, "optim.epochs=1", f"output_dir={run}"]) == 0
    assert cli_main(["knn", str(run), *SYNTH, f"output_dir={run / 'knn'}"]) == 0
    assert cli_main(["convert", str(run), str(root / "export"), "--to", "mpp"]) == 0
    return run, root / "export"


def test_convert_from_a_run_writes_a_model_card_whose_settings_are_a_recipe(shared, tmp_path):
    run, export = shared
    card = (export / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "mpp-mae" and "masked-autoencoder" in header["tags"]
    knn = json.loads((run / "knn" / "results.json").read_text())["protocols"]["knn"]["top1"]
    assert f"| knn | knn | all (64 images) | {knn:.2f} | - |" in card  # the run's own evaluation, as measured
    assert (export / "reconstruction.png").is_file() and "![reconstructions](reconstruction.png)" in card
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(card.split("```yaml\n")[1].split("```")[0])
    assert build_config(PretrainConfig, recipe, []).model.name == "mae_vit_micro_patch4"


def test_push_uploads_an_exported_folder_and_refuses_a_raw_run(shared, tmp_path):
    run, export = shared
    api = RecordingApi()
    assert push_folder(export, "me/tiny", private=True, api=api).endswith("/commit/0")
    assert api.calls == [("create_repo", "me/tiny", True, True), ("upload_folder", str(export), "me/tiny")]
    with pytest.raises(HubError, match="is a pretraining run: export it first"):
        push_folder(run, "me/tiny", api=RecordingApi())
    bare = tmp_path / "bare"
    shutil.copytree(export, bare)
    (bare / "README.md").unlink()
    with pytest.raises(HubError, match="no README.md model card"):
        push_folder(bare, "me/tiny", api=RecordingApi())


def test_hf_init_reads_the_hub_cache_offline(shared, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    _, export = shared
    repo = tmp_path / "cache" / "models--me--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(export, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    out = tmp_path / "knn"
    assert cli_main(["knn", "hf://me/tiny", *SYNTH, f"output_dir={out}"]) == 0
    assert json.loads((out / "results.json").read_text())["init"] == "hf://me/tiny"
    with pytest.raises(HubError, match="cannot get it from the Hugging Face Hub"):
        resolve_init("hf://me/absent")
    with pytest.raises(HubError, match="not a Hub reference"):
        resolve_init("hf://just-a-name")
