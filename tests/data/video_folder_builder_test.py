"""The video_folder tfds builder: folder -> array_record without TensorFlow, read back and trained from."""
import numpy as np
import tensorflow_datasets as tfds

from sora_jax.data import sources
from sora_jax.data.tfds_builders import video_folder
from tests.data import folder_fixture


def test_build_read_back_and_decode(tmp_path, monkeypatch):
  root = folder_fixture.make_folder(str(tmp_path / "videos"))
  monkeypatch.setattr(video_folder.VideoFolder, "max_skip_fraction", 0.5)  # the fixture is 4/9 bad
  path = video_folder.build(root, str(tmp_path / "tfds"), "data")

  ds = tfds.data_source("video_folder/data", split="train", data_dir=str(tmp_path / "tfds"))
  names = sorted(ds[i]["filename"].decode() for i in range(len(ds)))
  # Unreadable, empty and caption-less files are left out at build time; short clips are a training choice.
  assert names == ["a.mp4", "b.mp4", "c.mp4", "img.png", "short.mp4"]

  config = folder_fixture.config(f"runlocal,tfds={path}")
  config.data.max_skip_fraction = 1.0
  examples = list(sources.pixel_dataset(config, seed=0, size=(9, 16, 16), shard=False).to_iter_dataset())
  assert len(examples) == 3 and {e["caption"] for e in examples} == {f"clip number {i}" for i in range(3)}
  assert examples[0]["video"].shape == (9, 16, 16, 3)


def test_frames_config_stores_decoded_frames(tmp_path):
  root = folder_fixture.make_folder(str(tmp_path / "videos"), bad=False)
  path = video_folder.build(root, str(tmp_path / "tfds"), "frames")
  records = sources.TfdsVideos(path)
  by_name = {records[i]["path"]: records[i] for i in range(len(records))}
  assert by_name["a.mp4"]["frames"].shape == (14, 128, 213, 3)  # short side 128, aspect kept
  assert by_name["img.png"]["frames"].shape == (1, 128, 128, 3)
  dec = sources.DecodeClip(sources.fixed_size((9, 16, 16)), sources.ClipSpec("start"), seed=0, num_records=4,
                           max_skip_fraction=0.0)
  assert dec(0, by_name["a.mp4"])["video"].shape == (9, 16, 16, 3)
  np.testing.assert_array_equal(dec(0, by_name["a.mp4"])["video"], dec(5, by_name["a.mp4"])["video"])
