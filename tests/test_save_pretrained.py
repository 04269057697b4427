"""save_pretrained writes its own files and leaves everything else in the folder; files get the umask's modes."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile

import pytest
import safetensors.torch
import torch
from conftest import tiny_target
from test_training_helpers import config, write_stories
from test_training_helpers import tiny_target as tiny_trainable_target

from amphista import CheckpointError, InputError, MedusaDrafter, TargetModel, load_drafter
from amphista.files import atomic_write_json, current_umask, default_permissions
from amphista.training import train

OWN = {"README.md", "config.json", "model.safetensors"}


@pytest.fixture(scope="module")
def target():
    return TargetModel(tiny_target("llama", seed=5))


def drafter(target, seed=0):
    torch.manual_seed(seed)
    d = MedusaDrafter.for_target(target, num_heads=2)
    with torch.no_grad():
        for p in d.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return d


def snapshot(root) -> dict[str, bytes | None]:
    """Every path under root (folders as None) with its content, minus the drafter's own files."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if rel not in OWN:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


def fill(root) -> None:
    """A project folder: code, data, a hidden file, nested folders, an empty folder."""
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "main.py").write_text("print('hi')\n")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text('{"text": "Once upon a time"}\n')
    (root / "notes.txt").write_text("my notes\n")
    (root / ".env").write_text("SECRET=1\n")
    (root / "empty").mkdir()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_unrelated_files_and_folders_survive(target, tmp_path):
    fill(tmp_path)
    before = snapshot(tmp_path)
    d = drafter(target)
    d.save_pretrained(tmp_path)
    d.save_pretrained(tmp_path)  # a second save replaces the drafter's files, still nothing else
    assert snapshot(tmp_path) == before
    assert OWN <= {p.name for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = load_drafter(tmp_path)
    assert loaded.config == d.config
    assert_same_weights(loaded, d)


def test_dot_as_the_target_keeps_the_working_directory(target, tmp_path, monkeypatch):
    fill(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    d = drafter(target)
    d.save_pretrained(".")
    d.save_pretrained(os.getcwd())
    assert snapshot(tmp_path) == before
    assert_same_weights(load_drafter("."), d)


def test_missing_folders_are_created(target, tmp_path):
    d = drafter(target)
    d.save_pretrained(tmp_path / "a" / "b")
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == sorted(OWN)
    with pytest.raises(InputError, match="not a directory"):
        d.save_pretrained(tmp_path / "a" / "b" / "config.json")


def test_saving_back_into_a_training_output_folder_keeps_the_run(tmp_path):
    data = write_stories(tmp_path / "s.jsonl", n=16)
    cfg = config(tmp_path, [data], max_steps=2, save_every=1)
    train(cfg, target=tiny_trainable_target())
    out = tmp_path / "out"
    run_files = {"checkpoints", "head_accuracy.json", "metrics.jsonl", "training_config.json"}
    assert run_files <= {p.name for p in out.iterdir()}
    before = snapshot(out)
    loaded = load_drafter(out)
    with torch.no_grad():
        next(iter(loaded.trainable_parameters())).add_(1.0)  # fine-tuned further, then saved back
    loaded.save_pretrained(out)
    assert snapshot(out) == before
    assert_same_weights(load_drafter(out), loaded)


def test_a_failed_write_leaves_the_previous_drafter(target, tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("keep")
    first = drafter(target, seed=1)
    first.save_pretrained(tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in OWN}

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a tensor")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        drafter(target, seed=2).save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in OWN} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OWN | {"keep.txt"})  # no temporary files
    monkeypatch.undo()
    assert_same_weights(load_drafter(tmp_path), first)


def test_a_readme_of_your_own_is_kept_and_a_generated_card_is_updated(target, tmp_path):
    d = drafter(target)
    d.save_pretrained(tmp_path / "generated")
    card = (tmp_path / "generated" / "README.md").read_text()
    assert "num_heads` | `2`" in card
    MedusaDrafter.for_target(target, num_heads=3).save_pretrained(tmp_path / "generated")
    assert "num_heads` | `3`" in (tmp_path / "generated" / "README.md").read_text()  # not stale

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# My project\n")
    d.save_pretrained(mine)
    assert (mine / "README.md").read_text() == "# My project\n"

    (tmp_path / "generated" / "README.md").write_text(card.replace("# Medusa drafter", "# My drafter"))
    edited = (tmp_path / "generated" / "README.md").read_text()
    d.save_pretrained(tmp_path / "generated")
    assert (tmp_path / "generated" / "README.md").read_text() == edited


# ---- permissions ---------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root) -> dict[str, int]:
    found = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return found


def expect(root, umask):
    return {rel: (0o777 if os.path.isdir(os.path.join(root, rel)) else 0o666) & ~umask for rel in modes(root)}


def test_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_save_pretrained_and_json_follow_the_umask(target, tmp_path, umask):
    drafter(target).save_pretrained(tmp_path / "new" / "drafter")
    atomic_write_json(tmp_path / "new" / "result.json", {"ok": True})
    assert modes(tmp_path / "new") == expect(tmp_path / "new", umask)
    want = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}[umask]
    assert modes(tmp_path / "new")["drafter/model.safetensors"] == want[0]
    assert modes(tmp_path / "new")["drafter"] == want[1]


def test_a_training_run_follows_the_umask(tmp_path, umask):
    data = write_stories(tmp_path / "s.jsonl", n=16)
    cfg = config(tmp_path, [data], max_steps=2, save_every=1)
    train(cfg, target=tiny_trainable_target())
    out = tmp_path / "out"
    found = modes(out)
    assert found == expect(out, umask)
    want = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}[umask]
    step = "checkpoints/step-00000002"
    for name in (
        "model.safetensors",
        "training_config.json",
        f"{step}/model.safetensors",
        f"{step}/trainer_state.json",
    ):
        assert found[name] == want[0], name
    assert found[step] == want[1]
    json.loads((out / f"{step}/trainer_state.json").read_text())


def test_default_permissions_fixes_a_temporary_tree_but_not_what_links_point_to(tmp_path, umask):
    # The shape convert-llama2c and checkpoints produce: a mkdtemp folder with owner-only files in it.
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o640)
    root = tempfile.mkdtemp(dir=tmp_path)
    os.makedirs(os.path.join(root, "sub"), mode=0o700)
    fd, _ = tempfile.mkstemp(dir=os.path.join(root, "sub"))
    os.close(fd)
    os.symlink(outside, os.path.join(root, "link"))
    default_permissions(root)
    found = modes(root)
    del found["link"]  # os.stat follows the link; its target is checked below
    assert found == {rel: mode for rel, mode in expect(root, umask).items() if rel != "link"}
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o640
