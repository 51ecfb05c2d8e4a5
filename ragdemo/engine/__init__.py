"""Model internals shared by the methods: layer-range forward, decoding, prompts, scoring."""
