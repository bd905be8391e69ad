r"""tfds builder: a folder of captioned videos/images -> an array_record dataset, no TensorFlow needed.

  python -m sora_jax.data.tfds_builders.build --folder=~/my_videos --data_dir=~/tfds [--config=frames]

The folder is read like `sources.VideoFolder` (captions.csv / captions.jsonl inside, else sidecar .txt
files). Builder configs:
  data    the file's bytes as stored (mp4, ...): small, decoded by the training pipeline (default).
  frames  decoded uint8 frames [T, H, W, 3] resized so the short side is 128 (at most 64 frames): no
          decoding at training time, at many times the disk size.
Every example also has caption, filename (relative to the folder) and the probed num_frames, fps,
height, width. Read back with `tfds.data_source("video_folder/data", data_dir=...)`, or train on it with
`config.data.source='tfds'`, `config.data.path=<data_dir>/video_folder/data/1.0.0`. Bad files are skipped
with a warning; the build fails when more than `max_skip_fraction` of them are bad.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from sora_jax.data import sources
from sora_jax.data import video_io


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  store: str = "data"  # 'data' (file bytes) or 'frames' (decoded)
  short_side: int = 128
  max_frames: int = 64


class VideoFolder(tfds.core.GeneratorBasedBuilder):
  """Captioned videos and images of a local folder (pass it as the manual dir)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder of videos as download_config.manual_dir (see --folder)."
  BUILDER_CONFIGS = [
      VideoFolderConfig(name="data", store="data", description="file bytes"),
      VideoFolderConfig(name="frames", store="frames", description="decoded frames, short side 128"),
  ]
  max_skip_fraction = 0.1

  @tfds.core.utils.classproperty
  @classmethod
  def _checksums_path(cls):
    # Nothing is downloaded; tfds's own lookup of the checksums file needs `importlib_resources`.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.store == "data":
      media = {"data": tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)}
    else:
      media = {"frames": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES)}
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        **media,
        "caption": tfds.features.Text(),
        "filename": tfds.features.Text(),
        "num_frames": tfds.features.Scalar(dtype=np.int32),
        "fps": tfds.features.Scalar(dtype=np.float32),
        "height": tfds.features.Scalar(dtype=np.int32),
        "width": tfds.features.Scalar(dtype=np.int32),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, folder: str):
    records = sources.VideoFolder(folder).records
    counter = sources.SkipCounter(self.max_skip_fraction, min_samples=len(records), name="video_folder")
    for record in records:
      try:
        yield os.path.relpath(record["path"], folder), self._example(record, folder)
        counter.ok()
      except sources.TooManySkips:
        raise
      except sources.SkipSample as e:
        counter.skip(record["path"], str(e))
      except Exception as e:  # noqa: BLE001 -- a bad file is skipped and counted, never fatal on its own
        counter.skip(record["path"], f"unreadable: {type(e).__name__}: {e}")
    counter.check()
    logging.info("%s", counter.summary())

  def _example(self, record: dict, folder: str) -> dict:
    if record["error"]:
      raise sources.SkipSample(record["error"])
    path, cfg = record["path"], self.builder_config
    if os.path.getsize(path) == 0:
      raise sources.SkipSample("empty file: 0 bytes")
    if video_io.is_image(path):
      frames = video_io.read_image(path)
      info = video_io.VideoInfo(1, 0.0, frames.shape[1], frames.shape[2])
    else:
      info = video_io.probe(path)
      frames = None
    if cfg.store == "data":
      if frames is None:  # decode the first frame so unreadable files are caught at build time
        video_io.read_clip(path, start=0, num_frames=1, size=(16, 16), info=info)
      with open(path, "rb") as f:
        media = {"data": np.frombuffer(f.read(), np.uint8)}
    else:
      scale = cfg.short_side / min(info.height, info.width)
      size = (max(2, round(info.height * scale)), max(2, round(info.width * scale)))
      if frames is None:
        frames = video_io.read_clip(path, start=0, num_frames=min(info.num_frames, cfg.max_frames), size=size,
                                    info=info)
      else:
        frames = video_io.resize_crop(frames, *size)
      media = {"frames": frames}
    return {**media, "caption": record["caption"], "filename": os.path.relpath(path, folder),
            "num_frames": info.num_frames, "fps": info.fps, "height": info.height, "width": info.width}


def build(folder: str, data_dir: str, config: str = "data") -> str:
  """Builds the dataset of `folder` under `data_dir`; returns its directory (for config.data.path)."""
  folder = os.path.abspath(os.path.expanduser(folder))
  builder = VideoFolder(config=config, data_dir=os.path.expanduser(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
  return os.fspath(builder.data_dir)
