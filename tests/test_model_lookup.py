"""Where models are looked up: the user's folder (./models or $DASS_MODELS) first, then the bundled models (the
clone's models/ here; the wheel's package data after an install, tests/test_install.py); and the one line a command
prints when its extra is missing. Real model folders (the session's export, the shipped default model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from dass_deploy.errors import DeployError
from dass_deploy.repository import default_model_dir, find_model, list_models, model_roots, user_models_dir
from dass_train import extras

SHIPPED = REPO / "models"
SHIPPED_DEFAULT = (SHIPPED / "DEFAULT").read_text().strip()


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """A working folder outside the clone, no model variables set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DASS_MODELS", raising=False)
    monkeypatch.delenv("DASS_MODEL", raising=False)
    return tmp_path


def test_roots_are_the_user_folder_then_the_bundled_models(elsewhere, monkeypatch):
    assert model_roots() == [Path("models"), SHIPPED]
    monkeypatch.setenv("DASS_MODELS", str(elsewhere / "mine"))
    assert model_roots() == [elsewhere / "mine", SHIPPED] and user_models_dir() == elsewhere / "mine"
    monkeypatch.delenv("DASS_MODELS")
    monkeypatch.chdir(REPO)  # a clone run from its root: one folder, not two
    assert model_roots() == [Path("models")]


def test_names_are_found_in_the_user_folder_first(elsewhere, model_dir):
    assert find_model(SHIPPED_DEFAULT) == SHIPPED / SHIPPED_DEFAULT  # only bundled
    (elsewhere / "models").mkdir()
    (elsewhere / "models" / SHIPPED_DEFAULT).symlink_to(model_dir)
    assert find_model(SHIPPED_DEFAULT) == Path("models") / SHIPPED_DEFAULT  # the user's shadows the bundled one
    assert find_model(model_dir) == model_dir  # a folder is taken as given
    with pytest.raises(DeployError, match=r"model 'nope' not found: no such folder, and no model of that name in"):
        find_model("nope")
    with pytest.raises(DeployError, match="model folder not found: sub/nope"):
        find_model("sub/nope")


def test_default_model_order(elsewhere, model_dir, monkeypatch):
    assert default_model_dir() == SHIPPED / SHIPPED_DEFAULT  # no user DEFAULT: the bundled one
    (elsewhere / "models").mkdir()
    (elsewhere / "models" / "r18").symlink_to(model_dir)
    (elsewhere / "models" / "DEFAULT").write_text("r18\n")
    assert default_model_dir() == Path("models") / "r18"
    (elsewhere / "models" / "DEFAULT").write_text(f"{SHIPPED_DEFAULT}\n")  # a user DEFAULT may name a bundled model
    assert default_model_dir() == SHIPPED / SHIPPED_DEFAULT
    monkeypatch.setenv("DASS_MODEL", "r18")  # the variable wins, as a name or a folder
    assert default_model_dir() == Path("models") / "r18"
    monkeypatch.setenv("DASS_MODEL", str(model_dir))
    assert default_model_dir() == model_dir


def test_listing_merges_the_folders_by_name(elsewhere, model_dir):
    (elsewhere / "models").mkdir()
    (elsewhere / "models" / SHIPPED_DEFAULT).symlink_to(model_dir)
    (elsewhere / "models" / "r18").symlink_to(model_dir)
    found = {info.path.name: info.path for info in list_models()}
    shipped = {p.name for p in SHIPPED.iterdir() if (p / "meta.json").is_file()}
    assert set(found) == shipped | {"r18"}
    assert found[SHIPPED_DEFAULT] == Path("models") / SHIPPED_DEFAULT  # the first folder holding a name wins
    assert [info.path.name for info in list_models(elsewhere / "models")] == sorted([SHIPPED_DEFAULT, "r18"])


def test_export_writes_to_the_user_models_folder(elsewhere, monkeypatch):
    import click

    from dass_deploy.cli_export import export

    out = next(p for p in export.params if p.name == "out")
    assert out.get_default(click.Context(export)) == "models"
    monkeypatch.setenv("DASS_MODELS", str(elsewhere / "mine"))
    assert out.get_default(click.Context(export)) == str(elsewhere / "mine")


def test_missing_extra_names_the_extra(monkeypatch):
    assert extras.missing_extra("dass-export", "train") is None  # the suite has every CPU extra
    monkeypatch.setitem(extras.EXTRAS, "train", (("torch", "PyTorch"), ("dass_no_such_module", "Nothing")))
    assert extras.missing_extra("dass-export", "train") == "dass-export needs Nothing: pip install 'dass[train]'"
