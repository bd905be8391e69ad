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


class TestRandomCrop:

  def _frames(self, t=3, h=64, w=96):
    # Distinct values everywhere, different per frame, so a window's position can be read back.
    base = np.arange(h * w * 3, dtype=np.int64).reshape(1, h, w, 3) % 251
    return ((base + 7 * np.arange(t)[:, None, None, None]) % 256).astype(np.uint8)

  def _position(self, frames, out):
    """(top, left) of the unresized window of frames equal to out, or None."""
    oh, ow = out.shape[1:3]
    for top in range(frames.shape[1] - oh + 1):
      for left in range(frames.shape[2] - ow + 1):
        if np.array_equal(frames[:, top:top + oh, left:left + ow], out):
          return top, left
    return None

  def test_native_scale_window_is_an_exact_crop_at_a_random_position(self):
    frames = self._frames()
    positions = set()
    for seed in range(8):
      # scale 0.01 asks for a window smaller than the output: it is clamped to the output size (no upsampling),
      # so the result is a plain sub-array, the same window in every frame.
      out = video_io.random_crop(frames, 16, 16, (0.01, 0.01), np.random.default_rng(seed))
      assert out.shape == (3, 16, 16, 3)
      pos = self._position(frames, out)
      assert pos is not None
      positions.add(pos)
    assert len(positions) >= 6  # uniform positions, not the center

  def test_deterministic_by_rng_and_scale_range_is_used(self):
    frames = self._frames()
    a = video_io.random_crop(frames, 16, 16, (0.1, 1.0), np.random.default_rng(3))
    b = video_io.random_crop(frames, 16, 16, (0.1, 1.0), np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    # The whole largest window (scale 1): a 64x64 square of the 64x96 frame, resized to 16x16.
    full = video_io.random_crop(frames, 16, 16, (1.0, 1.0), np.random.default_rng(0))
    assert full.shape == (3, 16, 16, 3) and self._position(frames, full) is None
    squares = [video_io.resize_crop(frames[:, :, left:left + 64], 16, 16) for left in range(33)]
    assert any(np.array_equal(full, s) for s in squares)

  def test_keeps_the_output_aspect_and_upsamples_only_small_sources(self):
    frames = self._frames(h=8, w=40)
    out = video_io.random_crop(frames, 16, 32, (0.1, 1.0), np.random.default_rng(0))
    assert out.shape == (3, 16, 32, 3)

  def test_decoder_crops_randomly_from_config(self, tmp_path):
    path = os.path.join(str(tmp_path), "v.mp4")
    video_io.write_mp4(path, folder_fixture.video(12, height=48, width=64))
    record = {"path": path, "caption": "c", "index": 0, "error": ""}
    clips = {}
    for crop in ("center", "random"):
      spec = sources.ClipSpec.from_config({"clip_sampling": "start", "crop": crop, "crop_scale": (0.1, 0.5)})
      dec = sources.DecodeClip(sources.fixed_size((5, 16, 16)), spec, seed=0, num_records=1, max_skip_fraction=0)
      clips[crop] = [dec(i, record)["video"] for i in range(4)]
    assert all(c.shape == (5, 16, 16, 3) for c in clips["random"])
    assert all(np.array_equal(c, clips["center"][0]) for c in clips["center"])
    assert len({c.tobytes() for c in clips["random"]}) == 4  # a new window per index, the same on a rerun
    dec = sources.DecodeClip(sources.fixed_size((5, 16, 16)), spec, seed=0, num_records=1, max_skip_fraction=0)
    np.testing.assert_array_equal(dec(2, record)["video"], clips["random"][2])

  @pytest.mark.parametrize("field,value,match", [
      ("crop", "corner", r"config.data.crop='corner': choose 'center' or 'random'"),
      ("crop_scale", (0.5, 0.2), r"config.data.crop_scale=\(0.5, 0.2\): need \(lo, hi\)"),
      ("crop_scale", (0.0, 1.0), r"config.data.crop_scale=\(0.0, 1.0\)"),
  ])
  def test_bad_crop_fields_fail_validation_in_one_line(self, field, value, match):
    c = folder_fixture.config("runlocal,path=/nonexistent")
    c.data[field] = value
    with pytest.raises(configs_lib.ConfigError, match=match):
      configs_lib.validate(c)


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

  def test_tags_from_captions_files_reach_the_clip(self, tmp_path):
    root = str(tmp_path)
    video_io.write_mp4(os.path.join(root, "a.mp4"), folder_fixture.video(6))
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
      f.write(json.dumps({"path": "a.mp4", "caption": "one", "tags": ["cut", " night"]}) + "\n")
      f.write(json.dumps({"path": "a.mp4", "caption": "two", "tags": "exits"}) + "\n")
      f.write(json.dumps({"path": "a.mp4", "caption": "three"}) + "\n")
      f.write(json.dumps({"path": "a.mp4", "caption": "four", "tags": {"cut": 1}}) + "\n")
    records = sources.VideoFolder(root).records
    assert [r["tags"] for r in records] == ["cut,night", "exits", "", ""]
    assert records[3]["error"] == "bad tags: {'cut': 1} in captions.jsonl line 4 is not text or a list of text"
    csv_path = os.path.join(root, "list.csv")
    with open(csv_path, "w") as f:
      f.write("path,caption,tags\na.mp4,x,\"cut, exits\"\na.mp4,y,\n")
    assert [r["tags"] for r in sources.VideoFolder(csv_path).records] == ["cut,exits", ""]
    dec = sources.DecodeClip(sources.fixed_size((5, 16, 16)), sources.ClipSpec.from_config({"clip_sampling": "start"}),
                             seed=0, num_records=4, max_skip_fraction=1)
    assert dec(0, sources.VideoFolder(root)[0])["tags"] == "cut,night"

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


