"""The workflow DSL: Workflow classes, @rule, conditions, state types. Knows nothing of NATS
(but the names of the headers of the schedules it declares)."""
