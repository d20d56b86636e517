"""The HTTP layer: routers (service.api.routes), their dependencies (deps) and RFC 9457 errors (problems).
service.app builds the application from them. Never imports torch or transformers."""
