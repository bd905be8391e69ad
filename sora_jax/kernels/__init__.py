"""Native kernels that XLA does not generate well on its own (built on first use, see `cpu.py`)."""
