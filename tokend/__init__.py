"""tokend: keeps the OAuth2 tokens of multi-tenant integrations fresh."""

__version__ = "0.1.0"
