"""Everything that runs the model: loading, forward inputs, rollout with its cache and sampler, scoring, probes."""
