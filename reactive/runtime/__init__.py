"""The runtime: engine, registry, timers, codecs, metrics. Sees compiled definitions, not decorators."""
