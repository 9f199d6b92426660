"""The sandstream HTTP API (Litestar): validates, stores, enqueues, relays."""
