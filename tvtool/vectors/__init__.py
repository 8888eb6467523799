"""Task vectors: `TaskVector` (lazy Σ cᵢ·Δᵢ), its Δ terms, `DeltaSource` (where Δ comes from) and the `delta` verb."""
