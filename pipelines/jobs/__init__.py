"""The jobs users run in production: encode, decode, edit, analytics (query, search), warehouse DDL,
with the per-record code (``records``) and the Beam, Ray and Dataflow adapters around it."""
