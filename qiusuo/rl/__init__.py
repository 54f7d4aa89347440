"""Reasoning by reinforcement: SFT on chats, R1-style GRPO with rule-based rewards, built-in tasks, evaluation."""
