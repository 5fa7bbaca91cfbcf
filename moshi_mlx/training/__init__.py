"""Fine-tuning: losses equal to the references, training data, LoRA adapters."""
