"""Saving never loses a user's files: atomic_dir refuses folders that hold anything but a previous save."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import mmkit
from mmkit.files import CorruptFileError, DirectoryNotEmpty, atomic_dir


def _write(tmp, names):
    for n in names:
        (tmp / n).write_text(n)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_refuses_a_folder_with_foreign_files_and_changes_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    before = _mode(home)
    with pytest.raises(DirectoryNotEmpty, match=r"home: directory holds files mmkit did not write \(thesis\.tex\)"):
        with atomic_dir(home, ours=lambda p: (p / "mmkit.json").is_file(), overwrite=True) as tmp:
            _write(tmp, ["model.safetensors"])
    assert (home / "thesis.tex").read_text() == "years of work"
    assert _mode(home) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # no temp dir left behind


def test_refuses_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    ran = []
    with pytest.raises(DirectoryNotEmpty, match="notes.txt"):
        with atomic_dir(tmp_path, ours=lambda p: (p / "mmkit.json").is_file(), overwrite=True):
            ran.append(1)
    assert not ran and (tmp_path / "notes.txt").read_text() == "x"


def test_replaces_a_previous_save_only_when_asked_and_uses_the_usual_mode(tmp_path):
    target = tmp_path / "ckpt"
    ours = lambda p: (p / "a").is_file()  # noqa: E731
    with atomic_dir(target, ours) as tmp:
        _write(tmp, ["a", "b"])
    with pytest.raises(DirectoryNotEmpty, match="already holds a save; nothing was changed: pass overwrite=True"):
        with atomic_dir(target, ours) as tmp:
            _write(tmp, ["a"])
    with atomic_dir(target, ours, overwrite=True) as tmp:
        _write(tmp, ["a", "c"])
    assert sorted(p.name for p in target.iterdir()) == ["a", "c"]  # the old save is replaced as a whole
    mask = os.umask(0)
    os.umask(mask)
    assert _mode(target) == 0o777 & ~mask  # not mkdtemp's 0700


def test_an_empty_existing_folder_is_fine_and_a_file_is_not(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as tmp:
        _write(tmp, ["a"])
    assert (tmp_path / "empty" / "a").is_file()
    (tmp_path / "file").write_text("keep")
    with pytest.raises(DirectoryNotEmpty, match="not a directory"):
        with atomic_dir(tmp_path / "file"):
            pass
    assert (tmp_path / "file").read_text() == "keep"


def test_model_save_and_convert_keep_the_users_files(tmp_path):
    model = mmkit.build("recipes/tiny.yaml")
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    with pytest.raises(DirectoryNotEmpty, match="train.py"):
        model.save(project)
    with pytest.raises(DirectoryNotEmpty, match="train.py"):
        model.save(project, format="llava-hf")
    assert sorted(p.name for p in project.iterdir()) == ["train.py"]

    with pytest.raises(DirectoryNotEmpty, match="train.py"):
        model.save(project, overwrite=True)  # overwrite never covers a folder mmkit did not write
    model.save(tmp_path / "mm")
    with pytest.raises(DirectoryNotEmpty, match="already holds a save"):
        model.save(tmp_path / "mm")
    model.save(tmp_path / "mm", overwrite=True)
    model.save(tmp_path / "hf", format="llava-hf")
    model.save(tmp_path / "hf", format="llava-hf", overwrite=True)
    convert = lambda *a: subprocess.run([sys.executable, "-m", "mmkit.convert", *map(str, a)],  # noqa: E731
                                        capture_output=True, text=True)
    for extra in ([], ["--overwrite"]):
        run = convert(tmp_path / "mm", project, "--to", "mmkit", *extra)
        assert run.returncode == 2, run.stderr
        assert "train.py" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in project.iterdir()) == ["train.py"]
    assert (project / "train.py").read_text() == "print('mine')"
    run = convert(tmp_path / "mm", tmp_path / "hf", "--to", "llava-hf")
    assert run.returncode == 2 and "pass overwrite=True (--overwrite" in run.stderr
    assert convert(tmp_path / "mm", tmp_path / "hf", "--to", "llava-hf", "--overwrite").returncode == 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "m"
    mmkit.build("recipes/tiny.yaml").save(out)
    return out


def _copy(saved, tmp_path):
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "copy"))


def test_truncated_weights_name_the_file(saved, tmp_path):
    d = _copy(saved, tmp_path)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match=r"copy/model.safetensors: not a readable safetensors file"):
        mmkit.load(d)


@pytest.mark.parametrize("name,text,message", [
    ("mmkit.json", "{not json", r"copy/mmkit.json: not valid JSON"),
    ("mmkit.json", "[1, 2]", r"copy/mmkit.json: expected a JSON object, got list"),
])
def test_bad_json_names_the_file(saved, tmp_path, name, text, message):
    d = _copy(saved, tmp_path)
    (d / name).write_text(text)
    with pytest.raises(CorruptFileError, match=message):
        mmkit.load(d)


def test_a_list_config_json_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CorruptFileError, match=r"config.json: expected a JSON object, got list"):
        mmkit.load(tmp_path)


def test_missing_and_extra_tensors_are_named(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(saved, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    dropped = sorted(tensors)[0]
    tensors.pop(dropped)
    tensors["extra.weight"] = tensors[sorted(tensors)[0]].clone()
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"missing \['{dropped}'\].*unexpected \['extra.weight'\]"):
        mmkit.load(d)
