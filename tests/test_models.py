"""Model resolution: demo, folder and hub id are told apart and never swapped."""

from __future__ import annotations

import pytest

from llmq.errors import HubUnreachableError, ModelSourceError
from llmq.runtime.sources import models
from llmq.runtime.sources.models import SourceKind


def test_local_folder_resolves_to_itself(tiny_model):
    source = models.resolve_model(str(tiny_model))
    assert source.kind == SourceKind.folder and source.path == tiny_model.resolve()
    assert models.context_length(models.load_config(source)) == 128


@pytest.mark.parametrize("spec", ["./x", "/nonexistent/model", "~/nope", "a/b/c", "weird name!"])
def test_path_like_specs_that_do_not_exist_are_not_hub_lookups(spec):
    with pytest.raises(ModelSourceError, match="does not exist") as info:
        models.resolve_model(spec)
    assert not isinstance(info.value, HubUnreachableError)


@pytest.mark.parametrize("spec", ["gpt2", "org/model-name", "Org_1/Model.v2"])
def test_hub_ids_go_to_the_hub(spec):
    with pytest.raises(HubUnreachableError, match=spec):
        models.resolve_model(spec)


def test_revision_is_only_for_hub_ids(tiny_model):
    with pytest.raises(ModelSourceError, match="--revision"):
        models.resolve_model(str(tiny_model), revision="main")


def test_demo_name_never_falls_back_to_a_folder_named_demo(tmp_path, monkeypatch):
    """'demo' always means the embedded model; a folder called demo is reached as ./demo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    with pytest.raises(ModelSourceError, match="no config.json"):
        models.resolve_model("./demo")


def test_context_length_reads_common_keys():
    class Config:
        n_positions = 1024

    assert models.context_length(Config()) == 1024
    assert models.context_length(object()) is None
