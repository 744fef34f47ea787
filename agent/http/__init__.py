"""The local HTTP endpoint: the server, the OpenAI API, the operator endpoints and the one
mapping of every error to JSON."""
