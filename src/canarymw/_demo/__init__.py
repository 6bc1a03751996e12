"""The machinery behind ``canarymw demo``: blue/green demo apps, a server runner, a load driver.

Private: nothing here is public API. The demo apps live inside the package (not in
``examples/``) so that ``canarymw demo`` works from an installed wheel, where gunicorn
and uvicorn import them as ``canarymw._demo.flask_app:create_app()`` and
``canarymw._demo.starlette_app:create_app``.
"""
