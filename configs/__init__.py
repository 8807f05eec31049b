"""Model presets as data: `models.toml`, read by `jaxllm.config.load_presets`."""
