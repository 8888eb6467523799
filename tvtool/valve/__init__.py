"""CoT-Valve: MixChain datasets and training the valve LoRA (valve, ++, +P)."""
