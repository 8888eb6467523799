"""`svd-rank`: low-rank factors of Δ (or an operator's M), their report, and PEFT adapters from them."""
