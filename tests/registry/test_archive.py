"""Archives offered as a model: traversal, absolute paths, links and devices are refused before
anything is extracted, with nothing written; a clean archive registers like a folder."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_helpers import snapshot

from components.registry import ArtifactRefused
from components.registry.archive import _safe_name, extract_archive, inspect_archive
from components.registry.config import RegistryConfig


def tar_of(path: Path, model: Path | None, extra: list[tarfile.TarInfo] = (), prefix: str = "model",
           mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        if model is not None:
            tf.add(model, arcname=prefix)
        for info in extra:
            data = b"{}" if info.isreg() else None
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, link
    return ti


def refused(registry, archive: Path, match: str, tmp_path: Path) -> None:
    before = snapshot(registry.root)
    temp = Path(tempfile.gettempdir())
    leftovers = sorted(temp.glob("distillery-archive-*"))
    with pytest.raises(ArtifactRefused, match=match):
        registry.register_archive(archive, "lm")
    assert snapshot(registry.root) == before
    for place in (tmp_path, tmp_path.parent, temp, registry.root.parent):  # nothing escaped either
        assert not (place / "evil").exists()
    assert sorted(temp.glob("distillery-archive-*")) == leftovers  # the private extraction folder is gone


@pytest.mark.parametrize("member, match", [
    (info("../evil"), r"member '\.\./evil': a '\.\.' path \(path traversal\)"),
    (info("model/../../evil"), r"a '\.\.' path"),
    (info("/tmp/evil"), r"member '/tmp/evil': an absolute path"),
    (info("model/etc", tarfile.SYMTYPE, "/etc"), r"member 'model/etc': a symlink \(to '/etc'\)"),
    (info("model/passwd", tarfile.LNKTYPE, "/etc/passwd"), r"a hard link"),
    (info("model/null", tarfile.CHRTYPE), r"a device file or fifo"),
    (info("model/fifo", tarfile.FIFOTYPE), r"a device file or fifo"),
    (info("model\\..\\evil"), r"backslashes"),
    (info("model/model.json"), r"appears twice"),
])
def test_bad_tar_members_are_refused_with_nothing_written(registry, model_factory, tmp_path, member, match):
    archive = tar_of(tmp_path / "m.tar.gz", model_factory(), [member])
    refused(registry, archive, match, tmp_path)


def test_bad_zip_members_are_refused(registry, model_factory, tmp_path):
    model = model_factory()
    for name, match in (("../evil", r"path traversal"), ("/evil", r"absolute path")):
        path = tmp_path / "m.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted(model.rglob("*")):
                zf.write(f, f.relative_to(model).as_posix())
            zf.writestr(name, "{}")
        refused(registry, path, match, tmp_path)
    link = zipfile.ZipInfo("etc.json")
    link.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    refused(registry, path, r"member 'etc\.json': a symlink", tmp_path)


def test_pickle_inside_a_clean_archive_is_refused_after_private_extraction(registry, model_factory, tmp_path):
    import torch

    model = model_factory()
    torch.save({"w": torch.zeros(1)}, model / "model.safetensors")
    refused(registry, tar_of(tmp_path / "m.tar", model, mode="w"), r"pickle payload", tmp_path)


def test_not_an_archive(registry, tmp_path):
    junk = tmp_path / "m.tar.gz"
    junk.write_bytes(b"not an archive at all")
    refused(registry, junk, r"is not a tar or zip archive", tmp_path)


def test_declared_size_limit(model_factory, tmp_path):
    archive = tar_of(tmp_path / "m.tar", model_factory(), mode="w")
    with pytest.raises(ArtifactRefused, match="max_artifact_bytes"):
        inspect_archive(archive, RegistryConfig(max_artifact_bytes=100))


def test_clean_archives_register_like_folders(registry, model_factory, tmp_path):
    model = model_factory(seed=3)
    r = registry.register_archive(tar_of(tmp_path / "m.tar.gz", model), "lm")
    assert (r.version, r.changed) == ("v0.0.1", True)
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        for f in sorted(model.rglob("*")):
            zf.write(f, f.relative_to(model).as_posix())
    again = registry.register_archive(flat, "lm")  # the same files, zipped without a top folder
    assert (again.version, again.changed) == ("v0.0.1", False)
    out = tmp_path / "x"
    out.mkdir()
    assert extract_archive(flat, out, RegistryConfig()) == out and (out / "tokenizer" / "tokenizer.json").is_file()


names = st.lists(st.sampled_from(["a", "b", "..", ".", "", "/", "c.json", "\\", ":", "~"]), min_size=1,
                 max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(names)
def test_an_accepted_member_name_never_leaves_the_folder(raw):
    """Property: whatever the name, either it is refused or it resolves inside the target."""
    root = "/srv/target"
    try:
        clean = _safe_name(Path("a.tar"), raw)
    except ArtifactRefused:
        return
    assert ".." not in PurePosixPath(clean).parts and not clean.startswith("/") and "\\" not in clean
    resolved = os.path.normpath(os.path.join(root, clean))
    assert resolved == root or resolved.startswith(root + "/")
