"""Reading and writing: checkpoints (local, HF cache, Hub ids), streaming safetensors, sharded writers,
atomic outputs, locks, finished-work records, names, cards and pushing to the Hub."""
