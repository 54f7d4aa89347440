"""Low-rank adapters (LoRA, QLoRA): layer kinds over a frozen base, their targets, peft's file format."""
