"""The service platform: services and their context, the signed-document bus, request/response,
SQLite databases with migrations, the roster of members. Services build on it; it builds on host."""
