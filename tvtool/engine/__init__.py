"""One vLLM engine with in-place weight loads: the engine, its worker extension, prompts, logs, the reaper."""
