"""HTTP: the pages and the JSON API, one module per kind, over a shared base (views.base).

server.py names every route and maps it to a handler here.
"""
