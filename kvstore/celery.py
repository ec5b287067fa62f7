"""An entry point for Celery's own command line, nothing else: `celery -A kvstore inspect active` finds the app here.

The app is the workers' (`workers.celery.app`, the layer on top of the library). Nothing in kvstore
imports this module, so `import kvstore` never loads Celery.
"""

from __future__ import annotations

from workers.celery import app

__all__ = ["app"]
