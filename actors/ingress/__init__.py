"""The ingress process: the OpenAI-compatible HTTP app, its wire types, text <-> tokens, admission, metrics."""
