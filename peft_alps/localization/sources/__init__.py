"""Where attention weights are read from, a few rows at a time: a checkpoint folder, a live (possibly PEFT-wrapped or
quantized) module, or a Hub repo read by byte ranges into a per-commit cache. ``open.open_source`` picks one."""
