"""Video folder sources: clip reading, size policies, captions, and each kind of bad input."""
import json
import logging
import os

import numpy as np
import pytest

from sora_jax import configs_lib
from sora_jax.data import pipeline
from sora_jax.data import sources
from sora_jax.data import video_io
from tests.data import folder_fixture


def _first_pixel(clip):
  # The fixture writes frame k with value 8k in its top-left corner (H.264 keeps it within a few levels).
  return np.round(clip[:, 1, 1, 0].astype(np.float32) / 8).astype(int)


class TestReadClip:

  def test_seek_and_stride_match_full_decode(self, tmp_path):
    path = os.path.join(str(tmp_path), "v.mp4")
    video_io.write_mp4(path, folder_fixture.video(30))
    full = video_io.read_video(path)
    clip = video_io.read_clip(path, start=11, num_frames=5, step=3)
    np.testing.assert_array_equal(clip, full[11:26:3])
    np.testing.assert_array_equal(_first_pixel(clip), [11, 14, 17, 20, 23])

  def test_fps_resampling_and_resize(self, tmp_path):
    path = os.path.join(str(tmp_path), "v.mp4")
    video_io.write_mp4(path, folder_fixture.video(30), fps=8)
    info = video_io.probe(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (30, 8.0, 24, 40)
    clip = video_io.read_clip(path, start=0, num_frames=4, step=2.0, size=(16, 16), info=info)  # 8 -> 4 fps
    assert clip.shape == (4, 16, 16, 3)

  def test_too_short_raises(self, tmp_path):
    path = os.path.join(str(tmp_path), "v.mp4")
    video_io.write_mp4(path, folder_fixture.video(4))
    with pytest.raises(ValueError, match="stream ended after 4 of 9"):
      video_io.read_clip(path, start=0, num_frames=9, info=video_io.VideoInfo(20, 8.0, 24, 40))


class TestSizePolicy:

  def test_buckets_prefer_length_then_aspect(self):
    policy = sources.bucket_policy([(9, 32, 32), (9, 32, 64), (1, 32, 32), (1, 48, 32)])
    assert policy(100, 720, 1280) == (9, 32, 64)
    assert policy(100, 500, 500) == (9, 32, 32)
    assert policy(1, 1000, 600) == (1, 48, 32)  # a portrait image

  def test_area_keeps_aspect_and_divides(self):
    policy = sources.area_policy(res=64, max_frames=17, frame_stride=4, multiple=8)
    t, h, w = policy(15, 720, 1280)
    assert t == 13
    assert (h % 8, w % 8) == (0, 0)
    assert abs(w / h - 16 / 9) < 0.2


class TestCaptions:

  def test_jsonl_bad_rows_become_errors(self, tmp_path):
    root = str(tmp_path)
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
      f.write(json.dumps({"path": "a.mp4", "caption": "fine"}) + "\n")
      f.write(json.dumps({"path": "b.mp4", "caption": 3}) + "\n")
      f.write("{not json\n")
    records = sources.VideoFolder(root).records
    assert [r["error"].split(":")[0] for r in records] == ["", "no caption", "no path"]

  def test_csv_without_columns_fails_clearly(self, tmp_path):
    path = os.path.join(str(tmp_path), "list.csv")
    with open(path, "w") as f:
      f.write("file,text\na.mp4,x\n")
    with pytest.raises(ValueError, match="list.csv: CSV header must name columns 'path' and 'caption'"):
      sources.VideoFolder(path)

  def test_sidecar_captions(self, tmp_path):
    root = str(tmp_path)
    video_io.write_mp4(os.path.join(root, "a.mp4"), folder_fixture.video(3))
    with open(os.path.join(root, "a.txt"), "w") as f:
      f.write("a sidecar caption\n")
    assert sources.VideoFolder(root)[0]["caption"] == "a sidecar caption"


class TestBadInput:

  @pytest.fixture(autouse=True)
  def _folder(self, tmp_path):
    self.root = folder_fixture.make_folder(str(tmp_path))
    sources._WARNED.clear()

  def _config(self, max_skip):
    c = folder_fixture.config(f"runlocal,path={self.root}")
    c.data.max_skip_fraction = max_skip
    c.data.sizes = [(9, 16, 16), (1, 16, 16)]
    c.train_vae.sizes = [(9, 16, 16), (1, 16, 16)]
    configs_lib.validate(c)
    return c

  def test_each_bad_file_is_skipped_counted_and_named_once(self, caplog):
    c = self._config(1.0)
    dec = sources.decoder(c, sources.fixed_size((9, 16, 16)), seed=0, num_records=9)
    vf = sources.VideoFolder(self.root)
    with caplog.at_level(logging.WARNING):
      out = {os.path.basename(vf[i]["path"]): dec(i, vf[i]) for i in range(len(vf))}
      dec(len(vf), vf[4])  # the second epoch meets truncated.mp4 again: counted, not named again
    good = sorted(k for k, v in out.items() if v is not None)
    assert good == ["a.mp4", "b.mp4", "c.mp4"]  # the image is too short for a 9-frame size
    for name in folder_fixture.BAD:
      assert sum(f"skipping {os.path.join(self.root, name)}:" in r.getMessage() for r in caplog.records) == 1, name
    assert dec.counter.skipped == 7
    assert dec.counter.reasons == {"unreadable": 3, "empty file": 1, "too short": 2, "no caption": 1}
    assert "skipped 7 of 10 samples" in dec.counter.summary()
    assert out["a.mp4"]["video"].shape == (9, 16, 16, 3)

  def test_training_goes_on_past_bad_files(self):
    c = self._config(1.0)
    batches = iter(pipeline.vae_dataset(c, seed=0, batch_size=2))
    shapes = {next(batches)["video"].shape for _ in range(6)}
    assert shapes == {(2, 9, 16, 16, 3), (2, 1, 16, 16, 3)}

  def test_fails_past_max_skip_fraction(self):
    c = self._config(0.1)
    ds = sources.pixel_dataset(c, seed=0, size=(9, 16, 16), shuffle=True, repeat=True)
    with pytest.raises(sources.TooManySkips, match=r"skipped \d+ of \d+ samples.*max_skip_fraction=0.1"):
      for _ in zip(range(200), ds.to_iter_dataset()):
        pass

  def test_images_are_one_frame_videos(self):
    c = self._config(1.0)
    vf = sources.VideoFolder(self.root)
    dec = sources.decoder(c, sources.bucket_policy([(9, 16, 16), (1, 16, 16)]), seed=0, num_records=9)
    assert dec(3, vf[3])["video"].shape == (1, 16, 16, 3)


class TestMix:

  def test_weighted_mixture(self):
    import grain
    a, b = grain.MapDataset.range(0, 100), grain.MapDataset.range(1000, 1100)
    mixed = [sources.mix([a, b], [3.0, 1.0])[i] for i in range(40)]
    assert sum(x >= 1000 for x in mixed) == 10
    with pytest.raises(ValueError, match="weights"):
      sources.mix([a, b], [1.0])


