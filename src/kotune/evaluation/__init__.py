"""``kotune eval``: did the fine-tune help? Loss on held-out rows, generation checks, multiple choice, lm-eval."""
