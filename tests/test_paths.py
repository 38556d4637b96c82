"""The one rule set for names users give to what is written, the glob of name lists, and the
clean-up of what killed writers leave behind (musubi/files.py)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from musubi import files
from musubi.errors import MusubiError
from musubi.files import (
    MAX_NAME_PART_BYTES,
    atomic_save_file,
    glob_matcher,
    is_inside,
    is_leftover_name,
    path_inside,
    remove_leftovers,
    write_folder_atomically,
    write_text_atomically,
)


def inside(root, name, **options):
    return path_inside(str(root), name, where="Some Node", option="some_option", **options)


@pytest.mark.parametrize("name, expected", [
    ("my_lora", "my_lora"),
    ("  my_lora  ", "my_lora"),
    ("ema/my_lora", "ema/my_lora"),
    ("ema\\my_lora", "ema/my_lora"),
    ("my.lora.v2", "my.lora.v2"),
    ("Ünïcödé name", "Ünïcödé name"),
    ("x" * MAX_NAME_PART_BYTES, "x" * MAX_NAME_PART_BYTES),
])
def test_good_names_stay_inside_the_root(tmp_path, name, expected):
    assert inside(tmp_path, name) == os.path.join(tmp_path, *expected.split("/"))


def test_the_extension_is_added_once(tmp_path):
    assert inside(tmp_path, "a/b", extension=".safetensors") == str(tmp_path / "a" / "b.safetensors")
    assert inside(tmp_path, "a/b.safetensors", extension=".safetensors") == str(tmp_path / "a" / "b.safetensors")
    assert inside(tmp_path, "b.SafeTensors", extension=".safetensors") == str(tmp_path / "b.safetensors")
    assert inside(tmp_path, "b.json", extension=".safetensors") == str(tmp_path / "b.json.safetensors")


@pytest.mark.parametrize("name, reason", [
    ("", "is empty"),
    ("   ", "is empty"),
    ("../../x", "'..' part, which leaves the folder"),
    ("a/../../x", "'..' part"),
    ("..\\x", "'..' part"),
    ("a\\..\\..\\x", "'..' part"),
    ("..", "'..' part"),
    (".", "'.' part, the folder itself"),
    ("a/./b", "'.' part"),
    ("/tmp/evil", "is an absolute path"),
    ("//server/share/x", "is an absolute path"),
    ("\\\\server\\share\\x", "is an absolute path"),
    ("C:\\x", "drive letter 'C:'"),
    ("c:x", "drive letter 'c:'"),
    ("~/x", "starts with '~'"),
    ("dir/", "ends in '/'"),
    ("dir\\", "ends in '/'"),
    ("a//b", "empty folder name"),
    (".hidden", "hidden name '.hidden'"),
    ("a/.musubi-tmp-0123abcd-x", "hidden name"),
    ("a\x00b", "control character '\\x00'"),
    ("a\nb", "control character '\\n'"),
    ("a\x7fb", "control character '\\x7f'"),
    ("a:b/c", "drive letter"),
    ("x/a:b", "':', which Windows does not allow"),
    ("what?", "'?', which Windows does not allow"),
    ("a*b", "'*', which Windows does not allow"),
    ("CON", "device name on Windows"),
    ("x/nul.safetensors", "device name on Windows"),
    ("x" * 300, "has a name of 300 bytes"),
    ("é" * 101, "has a name of 202 bytes"),
    ("/".join(["x" * 150] * 7), "bytes long; at most 1000"),
    ("\ud800name", "not valid Unicode"),
])
def test_bad_names_are_refused_naming_node_option_and_what_to_write(tmp_path, name, reason):
    with pytest.raises(MusubiError) as caught:
        inside(tmp_path, name, example="my_lora")
    message = str(caught.value)
    assert message.startswith("Some Node: some_option ") and reason in message, message
    assert f"Write a name inside {tmp_path}, such as 'my_lora'" in message
    assert "\x00" not in message and "\n" not in message  # the name is shown escaped
    assert len(message) < 600  # a 300-character name is shown cut short
    assert os.listdir(tmp_path) == []


def test_a_name_ending_in_the_extension_only_is_refused(tmp_path):
    for name in (".safetensors", "dir/.safetensors"):
        with pytest.raises(MusubiError, match="has no name before '.safetensors'"):
            inside(tmp_path, name, extension=".safetensors")


def test_names_without_folders_when_folders_are_not_allowed(tmp_path):
    assert inside(tmp_path, "plain", allow_subfolders=False) == str(tmp_path / "plain")
    with pytest.raises(MusubiError, match=r"contains a folder \('/'\).*\(no folders\)"):
        inside(tmp_path, "a/b", allow_subfolders=False)


def test_non_text_is_refused(tmp_path):
    with pytest.raises(MusubiError, match="must be text, got int"):
        inside(tmp_path, 5)


def test_the_longest_allowed_name_leaves_room_for_every_suffix(tmp_path):
    """A 200-byte name plus Train LoRA's longest suffix and the hidden temporary prefix fits 255 bytes."""
    path = inside(tmp_path, "x" * MAX_NAME_PART_BYTES)
    os.makedirs(path)
    checkpoint = os.path.join(path, os.path.basename(path) + "-step000100.safetensors")
    atomic_save_file({"w": torch.zeros(1)}, checkpoint)
    write_folder_atomically(os.path.join(path, os.path.basename(path) + "-step000100-state"),
                            {"a.txt": lambda p: open(p, "w").close()})
    assert sorted(os.listdir(path)) == sorted([os.path.basename(checkpoint), os.path.basename(path) + "-step000100-state"])


def test_temporary_names_are_cut_to_255_bytes(tmp_path):
    """Library callers (the CLI) may pass any name the file system takes; the hidden sibling still fits."""
    long = str(tmp_path / ("é" * 120 + ".txt"))  # 244 bytes
    write_text_atomically(long, "x")
    assert os.listdir(tmp_path) == [os.path.basename(long)]


def test_is_inside(tmp_path):
    assert is_inside(str(tmp_path), str(tmp_path))
    assert is_inside(str(tmp_path / "a" / "b"), str(tmp_path))
    assert is_inside(str(tmp_path / "a" / ".." / "b"), str(tmp_path))
    assert not is_inside(str(tmp_path / ".." / "b"), str(tmp_path))
    assert not is_inside(str(tmp_path) + "-sibling", str(tmp_path))
    assert not is_inside("/", str(tmp_path))


# --- globs ----------------------------------------------------------------------------------------

NAMES = ["my_lora/a.safetensors", "my_lora/b.safetensors", "my_lora/old/c.safetensors",
         "my_lora/old/deeper/d.safetensors", "other/e.safetensors", "top.safetensors", "my_lora/x1.json"]


@pytest.mark.parametrize("pattern, expected", [
    ("my_lora/*.safetensors", ["my_lora/a.safetensors", "my_lora/b.safetensors"]),
    ("*.safetensors", ["top.safetensors"]),
    ("my_lora/?.safetensors", ["my_lora/a.safetensors", "my_lora/b.safetensors"]),
    ("my_lora?a.safetensors", []),
    ("my_lora/*/*.safetensors", ["my_lora/old/c.safetensors"]),
    ("my_lora/**/*.safetensors", ["my_lora/a.safetensors", "my_lora/b.safetensors", "my_lora/old/c.safetensors",
                                  "my_lora/old/deeper/d.safetensors"]),
    ("my_lora/**", ["my_lora/a.safetensors", "my_lora/b.safetensors", "my_lora/old/c.safetensors",
                    "my_lora/old/deeper/d.safetensors", "my_lora/x1.json"]),
    ("**/e.safetensors", ["other/e.safetensors"]),
    ("my_lora/[ab].safetensors", ["my_lora/a.safetensors", "my_lora/b.safetensors"]),
    ("my_lora/[!a].safetensors", ["my_lora/b.safetensors"]),
    ("my_lora[/]a.safetensors", []),
    ("my_lora[!x]a.safetensors", []),
    ("my_lora/x[0-9].json", ["my_lora/x1.json"]),
])
def test_glob_stars_stay_inside_one_folder(pattern, expected):
    assert [name for name in NAMES if glob_matcher(pattern)(name)] == expected


def test_glob_special_characters_are_literal_otherwise():
    assert glob_matcher("a+b(1).safetensors")("a+b(1).safetensors")
    assert not glob_matcher("a+b(1).safetensors")("aab1.safetensors")
    assert glob_matcher("a[b")("a[b")
    assert glob_matcher("a[]]b")("a]b")


# --- leftovers of killed writers ------------------------------------------------------------------

def make_old(path, age: float = 2 * files.LEFTOVER_AGE_SECONDS) -> None:
    """Back-date an entry and all it holds, as if nothing had touched it for ``age`` seconds."""
    past = time.time() - age
    for root, folders, names in os.walk(path, topdown=False):
        for name in folders + names:
            os.utime(os.path.join(root, name), (past, past))
    os.utime(path, (past, past))


def leftovers(folder):
    """One of each kind a killed writer leaves (present and earlier versions' names)."""
    made = {
        ".musubi-tmp-0123abcd-lora.safetensors": "file",
        ".musubi-tmp-89abcdef-lora-step000004-state": "folder",
        ".lora.safetensors.deadbeef.tmp": "file",
        ".lora-step000004-state.tmp-0badf00d": "folder",
        ".lora-step000002-state.old-12345678": "folder",
    }
    for name, kind in made.items():
        path = folder / name
        if kind == "folder":
            path.mkdir()
            (path / "network.safetensors").write_bytes(b"half")
        else:
            path.write_bytes(b"half")
    return sorted(made)


def test_the_leftover_names_are_exactly_these():
    assert is_leftover_name(".musubi-tmp-0123abcd-x", folder=False)
    assert is_leftover_name(".musubi-tmp-0123abcd-x", folder=True)
    assert is_leftover_name(".x.safetensors.0123abcd.tmp", folder=False)
    assert not is_leftover_name(".x.safetensors.0123abcd.tmp", folder=True)
    assert is_leftover_name(".x-state.tmp-0123abcd", folder=True)
    assert is_leftover_name(".x-state.old-0123abcd", folder=True)
    assert not is_leftover_name(".x-state.old-0123abcd", folder=False)
    for name in ("x.tmp", ".x.tmp", ".x.0123abc.tmp", ".x.0123ABCD.tmp", ".x.0123abcd.tmpx", ".musubi-tmp-x",
                 ".musubi-tmp-0123abcd", "musubi-tmp-0123abcd-x", ".x.tmp-0123abcdef", ".git", ".x.old-0123abc"):
        assert not is_leftover_name(name, folder=True) and not is_leftover_name(name, folder=False), name


def test_old_leftovers_go_and_nothing_else(tmp_path):
    names = leftovers(tmp_path)
    keep = [".git", ".cache.tmp", "lora.safetensors", "notes.0123abcd.tmp", ".musubi-tmp-x"]
    for name in keep:
        (tmp_path / name).write_text("mine")
    os.symlink(tmp_path / "lora.safetensors", tmp_path / ".musubi-tmp-00000000-link")
    for name in [*names, *keep]:
        make_old(tmp_path / name)
    removed = remove_leftovers(str(tmp_path))
    assert sorted(os.path.basename(path) for path in removed) == names
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, ".musubi-tmp-00000000-link"])


def test_young_leftovers_stay_a_live_writer_may_own_them(tmp_path):
    names = leftovers(tmp_path)
    assert remove_leftovers(str(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == names


def test_a_leftover_folder_still_being_filled_stays(tmp_path):
    """An old temporary folder with a freshly written file inside belongs to a live writer."""
    folder = tmp_path / ".musubi-tmp-0123abcd-lora-step000004-state"
    folder.mkdir()
    (folder / "network.safetensors").write_bytes(b"done long ago")
    make_old(folder)
    (folder / "optimizer.pt").write_bytes(b"being written now")
    assert remove_leftovers(str(tmp_path)) == []
    assert folder.is_dir()


def test_writing_into_a_folder_clears_its_old_leftovers(tmp_path):
    names = leftovers(tmp_path)
    for name in names:
        make_old(tmp_path / name)
    young = tmp_path / ".musubi-tmp-fedcba98-other.safetensors"
    young.write_bytes(b"a live writer's")
    atomic_save_file({"w": torch.zeros(1)}, str(tmp_path / "new.safetensors"))
    assert sorted(os.listdir(tmp_path)) == sorted([young.name, "new.safetensors"])


def test_replacing_a_folder_keeps_the_retired_one_fresh(tmp_path, monkeypatch):
    """The earlier folder is renamed to a hidden name before deletion: a sweep must not see it as old."""
    target = tmp_path / "state"
    write_folder_atomically(str(target), {"a.txt": lambda p: open(p, "w").write("1")})
    make_old(target)
    seen = []
    real_replace = os.replace

    def replace(source, destination):
        real_replace(source, destination)
        if os.path.basename(destination).startswith(files.TEMPORARY_PREFIX):
            seen.append(remove_leftovers(str(tmp_path)))

    monkeypatch.setattr(os, "replace", replace)
    write_folder_atomically(str(target), {"a.txt": lambda p: open(p, "w").write("2")})
    monkeypatch.undo()
    assert seen == [[]]
    assert (target / "a.txt").read_text() == "2" and os.listdir(tmp_path) == ["state"]
