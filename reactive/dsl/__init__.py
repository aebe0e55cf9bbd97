"""The workflow DSL: Workflow classes, @rule, conditions, state types. Knows nothing of NATS."""
