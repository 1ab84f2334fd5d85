"""`sdrt serve`: an A1111-compatible HTTP API and a web page over one loaded Pipeline (FastAPI + uvicorn).

Modules: a1111 (request models and their mapping to Pipeline.generate), codec (base64 images), jobs (the one
worker thread, its bounded queue and progress), app (routes, limits, auth), static/ (the page). Never imports
torch, diffusers or transformers.
"""
