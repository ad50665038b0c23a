"""The platform API: the HTTP facade for web frontends and platform backends."""
