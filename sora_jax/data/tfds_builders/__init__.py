"""tfds builders for sora_jax data (array_record, readable without TensorFlow)."""
