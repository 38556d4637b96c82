"""A FramePack folder's weight index is checked before it is used: a damaged or hand-edited
``diffusion_pytorch_model.safetensors.index.json`` is refused with a message naming the file,
never with a Python error from deep inside the loader."""

from __future__ import annotations

import json

import pytest

from musubi.errors import MusubiError
from musubi.framepack.loading import INDEX_FILE, inspect_source
from tiny_framepack import write_framepack_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_framepack_folder(tmp_path_factory.mktemp("framepack") / "FramePackI2V_tiny")


@pytest.fixture
def index(folder):
    """The folder's index as written; restored after each test."""
    path = folder / INDEX_FILE
    original = path.read_text()
    yield path, json.loads(original)
    path.write_text(original)


def test_a_valid_index_names_the_shards(folder, index):
    source = inspect_source(str(folder))
    assert source.layout == "folder" and len(source.files) == 3


@pytest.mark.parametrize("change, problem", [
    (lambda data: {**data, "weight_map": sorted(data["weight_map"].values())}, "'weight_map' is a list, not an object"),
    (lambda data: {**data, "weight_map": {**data["weight_map"], "x_embedder.proj.weight": 3}},
     "'weight_map' gives 'x_embedder.proj.weight' the value 3, not a file name"),
    (lambda data: {**data, "weight_map": {**data["weight_map"], "x_embedder.proj.weight": None}}, "the value None"),
    (lambda data: {**data, "weight_map": {"x_embedder.proj.weight": "../elsewhere.safetensors"}},
     "'../elsewhere.safetensors', which is not a plain file name in the folder"),
    (lambda data: {**data, "weight_map": {}}, "'weight_map' is empty"),
    (lambda data: {"metadata": data["metadata"]}, "it has no 'weight_map'"),
    (lambda data: [data], "it has no 'weight_map'"),
])
def test_a_malformed_index_is_refused_naming_the_file(folder, index, change, problem):
    path, data = index
    path.write_text(json.dumps(change(data)))
    with pytest.raises(MusubiError) as raised:
        inspect_source(str(folder))
    message = str(raised.value)
    assert message.startswith(f"Load FramePack DiT: {path} is not a usable diffusers weight index: "), message
    assert problem in message, message


def test_an_index_that_is_not_json_is_refused_naming_the_file(folder, index):
    path, _ = index
    path.write_text("{ weight_map: ")
    with pytest.raises(MusubiError, match=r"index\.json is not a usable diffusers weight index: it cannot be read as JSON"):
        inspect_source(str(folder))
