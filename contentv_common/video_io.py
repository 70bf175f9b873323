"""mp4 writing (mediapy + imageio-ffmpeg's ffmpeg, atomic) and reading (PyAV).

mediapy's reader passes `-vsync`, which the ffmpeg shipped by imageio-ffmpeg no longer accepts, so
frames are read back with PyAV instead.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from contentv_common.weights import atomic_file


def check_writable(path: str | Path) -> Path:
    """Fail now (before any model loads) if `path` cannot be written, creating nothing: a probe file is made and
    removed in its folder, or, where that folder does not exist yet (the write makes it), the nearest existing
    ancestor must be a writable folder. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a directory; give a file name such as {path / 'video.mp4'}")
    existing = next(p for p in path.absolute().parents if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        if existing == path.absolute().parent:
            fd, probe = tempfile.mkstemp(prefix=f".{path.stem}.probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{existing} is not writable")
    except OSError as e:
        raise PermissionError(f"output {path} is not writable: {e}") from None
    return path


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 24) -> Path:
    """frames [F, H, W, 3] uint8 -> H.264 mp4 at `fps`, written to a temporary file and renamed onto `path`."""
    import imageio_ffmpeg
    import mediapy

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4: frames must be [F, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_mp4: H.264 (yuv420p) needs even height and width, got {frames.shape[1:3]}")
    mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
    with atomic_file(path) as tmp:
        mediapy.write_video(tmp, frames, fps=fps)
    return Path(path)


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """-> (frames [F, H, W, 3] uint8, fps)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else float("nan")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames), fps
