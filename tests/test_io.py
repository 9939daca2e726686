"""Output files: the permissions a plain open() would give, and no temporary file left on any failure path."""

import os
import stat

import numpy as np
import pytest

from supergen.io import VideoWriter, check_output_path, write_json, write_video

FRAMES = np.zeros((5, 32, 48, 3), dtype=np.uint8)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    write_video(tmp_path / "v.mp4", FRAMES)
    write_json(tmp_path / "m.json", {"a": 1})
    assert _mode(tmp_path / "v.mp4") == expected
    assert _mode(tmp_path / "m.json") == expected


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    target = tmp_path / "v.mp4"
    target.write_bytes(b"old")
    target.chmod(0o640)
    write_video(target, FRAMES)
    assert _mode(target) == 0o640 and target.stat().st_size > 3


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_output_that_became_a_folder_fails_cleanly(tmp_path):
    """The issue's case: --output names a folder by the time the video is written; no hidden temp file stays."""
    writer = VideoWriter(tmp_path / "v.mp4")
    writer.append(FRAMES)
    (tmp_path / "v.mp4").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        writer.close(keep=True)
    assert _leftovers(tmp_path) == ["v.mp4"] and (tmp_path / "v.mp4").is_dir()


def test_interrupted_write_leaves_nothing(tmp_path):
    """Ctrl-C while the frames are encoded: no partial file, no temp file."""

    def frames():
        yield FRAMES[0]
        yield FRAMES[1]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video(tmp_path / "v.mp4", frames())
    assert _leftovers(tmp_path) == []


def test_encoder_failure_leaves_nothing(tmp_path):
    """Frames of the wrong shape make the encoder fail mid-file."""
    with pytest.raises(Exception):
        write_video(tmp_path / "v.mp4", [FRAMES[0], np.zeros((7, 9), dtype=np.float64)])
    assert _leftovers(tmp_path) == []


def test_failing_json_payload_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "m.json", {"x": object()})
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name,message",
    [("x.mp4/", "ends with a slash"), ("", "is a folder"), ("x.avi", "must end with .mp4"),
     ("missing/x.mp4", "does not exist")],
)
def test_output_path_checks_leave_no_probe(tmp_path, name, message):
    path = f"{tmp_path}/{name}" if name else str(tmp_path)
    with pytest.raises(ValueError, match=message):
        check_output_path(path)
    check_output_path(tmp_path / "ok.mp4")
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; /sys and /proc are in the table")
def test_unwritable_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot write to the output directory"):
            check_output_path(folder / "x.mp4")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_built_in_models_are_published_with_the_umask_modes(tmp_path, umask, monkeypatch, mask):
    # mkdtemp makes the staging folder 0700 and save_pretrained writes safetensors 0600; the published
    # model folder must read like one made by mkdir/open.
    from supergen.models import tiny_model_path

    umask(mask)
    monkeypatch.setenv("SUPERGEN_CACHE", str(tmp_path / "cache"))
    folder = tiny_model_path("tiny-wan")
    paths = [folder, *folder.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths)
    for p in paths:
        assert _mode(p) == (0o777 if p.is_dir() else 0o666) & ~mask, p
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
