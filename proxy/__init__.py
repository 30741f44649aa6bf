"""skill-engine-proxy: attach a cached OAuth2 token to calls to TechWolf's Skill Engine API."""

__version__ = "0.1.0"
