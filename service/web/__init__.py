"""The dashboard: server-rendered page shells (Jinja2) whose small scripts read and write through the public /v1
API with the user's key, and the static files they need, all served by HubTune itself (no CDN)."""
