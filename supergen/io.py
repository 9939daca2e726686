"""Output files: videos and metrics, written atomically (temp file, then rename)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...] = (".mp4",)) -> Path:
    """Fail early (before any model work) on an output path that cannot be written.

    Refused with a ``ValueError`` naming the path: a trailing slash (it names a
    folder), an existing folder, a missing or unwritable parent folder (tried
    by creating and removing a probe file there, so read-only mounts such as
    ``/sys`` and pseudo file systems such as ``/proc`` are caught as well as
    permissions), and a wrong suffix.
    """
    text = os.fspath(path)
    if not text:
        raise ValueError("output path is empty; give a file name such as out.mp4")
    if text.endswith(("/", os.sep)):
        raise ValueError(f"output {text!r} ends with a slash, so it names a folder; give a file name "
                         f"(did you mean {text.rstrip('/' + os.sep)!r}?)")
    out = Path(text)
    if out.is_dir():
        raise ValueError(f"output {text!r} is a folder; give a file name inside it, e.g. {str(out / 'out')}"
                         f"{suffixes[0] if suffixes else ''}")
    if suffixes and out.suffix.lower() not in suffixes:
        raise ValueError(f"output {text!r} must end with {' or '.join(suffixes)}")
    if not out.parent.is_dir():
        raise ValueError(f"output directory {str(out.parent)!r} does not exist; create it or choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.stem}-probe-", dir=out.parent)
    except OSError as err:
        raise ValueError(
            f"cannot write to the output directory {str(out.parent)!r} ({err.strerror or err}); choose another path"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return out


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(folder: str | os.PathLike) -> Path:
    """Give ``folder`` and everything under it the modes plain ``mkdir``/``open`` would have (umask applied).

    ``tempfile.mkdtemp`` makes folders 0700 and ``save_pretrained`` writes its
    safetensors 0600; a model folder published from either must still be
    readable by whoever may read its parent.
    """
    root = Path(folder)
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    return root


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target`` with the mode a plain ``open(target, "w")`` would have left.

    ``mkstemp`` creates files 0600 whatever the umask; a replaced file keeps its
    old mode, as it would when rewritten in place.
    """
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    try:
        os.replace(tmp, target)
    except IsADirectoryError:
        raise ValueError(f"output {str(target)!r} is a folder (it appeared during the run); nothing was written") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _publish(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


class VideoWriter:
    """Append frames to an mp4 as they come (H.264 via imageio-ffmpeg), atomically.

    The file appears at ``path`` when the writer is closed normally, or when
    :meth:`close` is called with ``keep=True`` (a stream stopped by the
    user keeps what was made); a crash leaves no file behind.
    """

    def __init__(self, path: str | os.PathLike, fps: int = 16, lazy: bool = False):
        if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
            raise ValueError(f"fps={fps!r} must be an integer >= 1")
        self.path = Path(path)
        self.fps = fps
        self.frames = 0
        self._closed = False
        self._writer = None
        self.tmp = None
        # lazy: the temporary file and the encoder start with the first frame (a multi-process run
        # streams its decode into the writer; a job killed before then leaves nothing behind).
        if not lazy:
            self._open()

    def _open(self) -> None:
        import imageio.v2 as imageio

        fps = self.fps
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.stem}-", suffix=self.path.suffix, dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp_name)
        try:
            # macro_block_size=1: sizes that are multiples of 16 are not required of tiny models.
            self._writer = imageio.get_writer(
                self.tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1, ffmpeg_log_level="error"
            )
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def append(self, frames_FHW3: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        for frame in frames_FHW3:
            self._writer.append_data(frame)
            self.frames += 1

    def close(self, keep: bool = True) -> None:
        """Finish the file; with ``keep`` (and at least one frame) rename it into place, else remove it.

        The temporary file is gone afterwards whatever fails (the encoder, the
        rename); idempotent.
        """
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return
        try:
            try:
                self._writer.close()
            except Exception:
                if keep:
                    raise
                # Discarding anyway: an encoder that died with the run (Ctrl-C reaches ffmpeg too) is expected.
            if keep and self.frames:
                _publish(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(keep=exc_type is None or issubclass(exc_type, KeyboardInterrupt))


def write_video(path: str | os.PathLike, frames_FHW3: np.ndarray, fps: int = 16) -> Path:
    """Write uint8 frames (F, H, W, 3) to an mp4 atomically: on any failure (Ctrl-C included) nothing is left."""
    writer = VideoWriter(path, fps=fps)
    try:
        writer.append(frames_FHW3)
    except BaseException:
        writer.close(keep=False)
        raise
    writer.close(keep=True)
    return Path(path)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return Path(path)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounded."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_skip_map(path: str | os.PathLike, region_skip_map: list, title: str = "") -> Path:
    """Heat map PNG of where the step cache reused outputs, written atomically.

    ``region_skip_map`` is the metrics' ``cache.region_skip_map``: per step, the
    reused fraction of every region (F, H, W nested lists). One panel per step
    (averaged over frames; dark = computed, bright = reused) and a last panel
    with the fraction of steps each region was reused.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = np.asarray(region_skip_map, dtype=np.float64).mean(axis=1)  # (steps, H, W)
    panels = [*maps, maps.mean(axis=0)]
    labels = [f"step {i}" for i in range(len(maps))] + ["all steps"]
    cols = min(len(panels), 8)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.5 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel, label in zip(axes.flat, panels, labels):
        image = ax.imshow(panel, vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
        ax.set_title(label, fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="reused fraction")
    fig.suptitle(title or "region cache: reused (bright) vs computed (dark)", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
