"""The rule-set lint (in progress)."""
