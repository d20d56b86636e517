"""One router per resource; service.api.main mounts them."""
