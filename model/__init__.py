"""Model-side helpers: loading OpenLLaMA (hub id or local folder) and building tiny stand-ins."""
