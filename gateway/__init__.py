"""An OpenAI-style HTTP gateway in front of the Triton endpoint: API keys mapped to tenants and tiers."""
