r"""Builds the video_folder tfds dataset of a folder (see `video_folder`); prints its directory.

  python -m sora_jax.data.tfds_builders.build --folder=~/my_videos --data_dir=~/tfds [--config=frames]
"""
from absl import app
from absl import flags

_FOLDER = flags.DEFINE_string("folder", None, "Folder of captioned videos/images.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir to write to.", required=True)
_CONFIG = flags.DEFINE_string("config", "data", "Builder config: data (file bytes) | frames (decoded).")


def main(argv):
  del argv
  # Imported here, not run as __main__: tfds finds a builder's files through its module.
  from sora_jax.data.tfds_builders import video_folder
  print(video_folder.build(_FOLDER.value, _DATA_DIR.value, _CONFIG.value))


if __name__ == "__main__":
  app.run(main)
